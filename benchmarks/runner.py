"""Shared benchmark runner: warm-up, interleaved repetitions, medians, a table of ratios.

Every technique reports speed the same way::

    from benchmarks.runner import compare
    compare({"torch AdamW (fused)": step_fused, "ours": step_ours}, baseline="torch AdamW (fused)",
            title="optimizer step, 10.5 M Llama")

Each case is a zero-argument callable doing one unit of work (one optimizer step, one
forward+backward). The runner calibrates how many calls make one timed sample (at least
``min_sample_s`` for the baseline), warms every case up, then takes ``repeats`` samples of
each case *interleaved*: repetition ``r`` runs the cases in an order rotated by ``r``, so a
slow drift of the machine (thermal, another process) spreads over all cases instead of
biasing whichever ran last. It reports the median time per call, the interquartile range
and the ratio of medians against the named baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    name: str
    median_s: float
    q1_s: float
    q3_s: float
    ratio: float  # median / baseline median

    @property
    def iqr_pct(self) -> float:
        return 100.0 * (self.q3_s - self.q1_s) / self.median_s if self.median_s else 0.0


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def compare(cases: Mapping[str, Callable[[], object]], baseline: str, *, repeats: int = 15, warmup: int = 3,
            number: int | None = None, min_sample_s: float = 0.05, title: str = "", unit: str = "ms",
            timer: Callable[[], float] = time.perf_counter, print_table: bool = True) -> list[Result]:
    """Time each case, interleaved; return (and print) results in the order given."""
    if baseline not in cases:
        raise ValueError(f"baseline {baseline!r} is not one of the cases {list(cases)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    if number is None:  # calibrate on the baseline
        number = 1
        while True:
            start = timer()
            for _ in range(number):
                cases[baseline]()
            if timer() - start >= min_sample_s or number >= 1 << 20:
                break
            number *= 2
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            fn = cases[name]
            start = timer()
            for _ in range(number):
                fn()
            samples[name].append((timer() - start) / number)
    base = statistics.median(samples[baseline])
    results = []
    for name in names:
        q1, med, q3 = _quartiles(samples[name])
        results.append(Result(name, med, q1, q3, med / base if base else float("nan")))
    if print_table:
        print(format_table(results, baseline, title=title, unit=unit, repeats=repeats, number=number))
    return results


def format_table(results: list[Result], baseline: str, title: str = "", unit: str = "ms", repeats: int = 0,
                 number: int = 0) -> str:
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    width = max(len(r.name) for r in results)
    lines = []
    if title:
        lines.append(f"### {title}")
    if repeats:
        lines.append(f"(median of {repeats} interleaved samples x {number} calls; ratio vs '{baseline}')")
    lines.append(f"| {'case':<{width}} | {unit + ' / call':>11} | {'IQR %':>6} | {'ratio':>6} |")
    lines.append(f"|{'-' * (width + 2)}|{'-' * 13}|{'-' * 8}|{'-' * 8}|")
    for r in results:
        lines.append(f"| {r.name:<{width}} | {r.median_s * scale:>11.3f} | {r.iqr_pct:>6.1f} | {r.ratio:>6.2f} |")
    return "\n".join(lines)


def benchmark_args(description: str, device: bool = False, clock: bool = False) -> argparse.Namespace:
    """Common flags: ``--repeats``, ``--threads`` (default: torch's), ``--quick`` (few repeats); with
    ``device=True`` also ``--device`` (default ``cpu``; the cases must synchronise a CUDA device themselves); with
    ``clock=True`` also ``--clock`` (``wall``, or ``cpu``: the process's CPU time, which a shared machine's
    descheduling does not inflate; a collective's wait is not counted there, its work is)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if device:
        parser.add_argument("--device", default="cpu")
    if clock:
        parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="3 repeats, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args
