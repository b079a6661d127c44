"""``lightning-ext plot RUN_DIR``: one PNG of a run's training loss, validation metrics and technique diagnostics.

Reads the ``metrics.csv`` that Lightning's ``CSVLogger`` writes (``RUN_DIR`` is a ``version_N`` folder, or the
folder above them: the newest version is drawn) and writes ``metrics.png`` next to it. One panel for the
``train/*`` series, one for ``val/*``, and one per technique prefix (``quest/``, ``reweight/``, ``lawn/``,
``cram/``, ``clnp/``, ``gora/``, ...), each series against the global step. A run resumed from a checkpoint
logs into the next ``version_N`` (its steps go on from the checkpoint's); ``all_versions=True``
(``lightning-ext plot RUN_DIR --all``) draws every version of ``RUN_DIR`` as one run. Needs matplotlib
(``pip install lightning-ext[plot]``). Written here because Lightning's loggers draw nothing themselves.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path

__all__ = ["find_metrics", "plot_run", "read_metrics"]


def find_metrics(run_dir: str | Path, all_versions: bool = False) -> list[Path]:
    """The ``metrics.csv`` of ``run_dir``, or of its newest ``version_N`` subfolder (all of them, oldest first,
    with ``all_versions``)."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.csv").is_file():
        return [run_dir / "metrics.csv"]
    versions = sorted((p for p in run_dir.glob("version_*") if (p / "metrics.csv").is_file()),
                      key=lambda p: int(m.group(1)) if (m := re.fullmatch(r"version_(\d+)", p.name)) else -1)
    if not versions:
        raise FileNotFoundError(f"no metrics.csv in {run_dir} or its version_* folders: plot reads what "
                                "Lightning's CSVLogger writes (add it to trainer.logger, alongside TensorBoard)")
    return [v / "metrics.csv" for v in versions] if all_versions else [versions[-1] / "metrics.csv"]


def read_metrics(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Each column of a CSVLogger file as ``(steps, values)``, empty cells left out."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for name, cell in row.items():
                if name in ("step", "epoch") or cell in (None, ""):
                    continue
                value = float(cell)
                if math.isfinite(value):
                    steps, values = series.setdefault(name, ([], []))
                    steps.append(step)
                    values.append(value)
    return series


def _panels(series: dict[str, tuple[list[int], list[float]]]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(series):
        prefix = name.split("/", 1)[0] if "/" in name else re.split(r"[-_]", name, maxsplit=1)[0]
        groups[prefix].append(name)
    order = [p for p in ("train", "val") if p in groups] + sorted(p for p in groups if p not in ("train", "val"))
    return {p: groups[p] for p in order}


MAX_SERIES = 8


def _mean_over_layers(names: list[str], series: dict[str, tuple[list[int], list[float]]]
                      ) -> dict[str, tuple[list[int], list[float]]]:
    """A panel with more than :data:`MAX_SERIES` lines (a diagnostic per layer: ``quest/<layer>/input_rel_mse``)
    draws their mean per step instead: the path segment with the most distinct values (the layer) becomes ``*``."""
    if len(names) <= MAX_SERIES:
        return {n: series[n] for n in names}
    split = [n.split("/") for n in names]
    deep = [parts for parts in split if len(parts) > 2]  # prefix/layer/metric; prefix/metric stays as it is
    width = max((len(parts) for parts in deep), default=0)
    distinct = [len({parts[i] for parts in deep if len(parts) > i}) for i in range(width)]
    varying = max(range(1, width), key=lambda i: distinct[i]) if width > 1 else None
    groups: dict[str, list[str]] = defaultdict(list)
    for name, parts in zip(names, split):
        if varying is None or len(parts) <= 2:
            groups[name].append(name)
        else:
            groups["/".join("*" if i == varying else p for i, p in enumerate(parts))].append(name)
    out = {}
    for key, members in groups.items():
        by_step: dict[int, list[float]] = defaultdict(list)
        for member in members:
            for step, value in zip(*series[member]):
                by_step[step].append(value)
        steps = sorted(by_step)
        label = key if len(members) == 1 else f"{key} (mean of {len(members)})"
        out[label] = (steps, [sum(by_step[t]) / len(by_step[t]) for t in steps])
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, all_versions: bool = False) -> Path:
    """Draw ``run_dir``'s metrics; returns the PNG's path (``metrics.png`` beside the newest ``metrics.csv`` by
    default)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("lightning-ext plot draws with matplotlib: pip install 'lightning-ext[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = find_metrics(run_dir, all_versions)
    path = paths[-1]
    series: dict[str, tuple[list[int], list[float]]] = {}
    for part in paths:  # a resumed run's version continues the steps of the one before
        for name, (steps, values) in read_metrics(part).items():
            into = series.setdefault(name, ([], []))
            into[0].extend(steps)
            into[1].extend(values)
    if not series:
        raise ValueError(f"{path} holds no logged values yet")
    panels = _panels(series)
    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.4 * rows), squeeze=False)
    for ax, (prefix, names) in zip(axes.flat, panels.items()):
        lines = _mean_over_layers(names, series)
        for name, (steps, values) in lines.items():
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
        ax.set_title({"train": "training", "val": "validation"}.get(prefix, prefix))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=1 if len(lines) < 5 else 2)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(str(path.parent) if len(paths) == 1 else f"{Path(run_dir)} ({len(paths)} versions)")
    fig.tight_layout()
    out = Path(out) if out is not None else path.with_name("metrics.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
