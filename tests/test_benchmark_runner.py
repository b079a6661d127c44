"""The benchmark runner's bookkeeping (with a fake clock: no timing in tests)."""

from __future__ import annotations

import pytest

from benchmarks.runner import compare, format_table


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_medians_and_ratios():
    clock, order = FakeClock(), []

    def case(name, cost):
        def run():
            order.append(name)
            clock.now += cost
        return run

    results = compare({"base": case("base", 1.0), "slow": case("slow", 3.0), "fast": case("fast", 0.5)},
                      baseline="base", repeats=4, warmup=1, number=2, timer=clock, print_table=False)
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == ["base", "slow", "fast"]
    assert by_name["base"].median_s == 1.0 and by_name["slow"].ratio == 3.0 and by_name["fast"].ratio == 0.5
    timed = order[3:]  # after one warm-up call of each
    firsts = [timed[i * 6] for i in range(4)]  # the first case of each repetition rotates
    assert firsts == ["base", "slow", "fast", "base"]


def test_calibration_and_errors():
    clock = FakeClock()

    def tick():
        clock.now += 0.01

    results = compare({"a": tick}, baseline="a", repeats=1, warmup=0, min_sample_s=0.05, timer=clock,
                      print_table=False)
    assert results[0].median_s == pytest.approx(0.01)
    with pytest.raises(ValueError, match="baseline 'b'"):
        compare({"a": tick}, baseline="b")
    table = format_table(results, "a", title="t")
    assert "| a " in table and "1.00" in table
