"""The results as a table (stdout), a JSON file and a PNG chart."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

from tests.benchmarks.common import Figure, Results


def _value(value: float, unit: str) -> str:
    if unit == "msg/s":
        return f"{value:,.0f} msg/s"
    if unit == "s":
        return f"{value * 1000:,.0f} ms"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.1f} {unit}"


def figures_table(results: Results) -> str:
    rows = [("benchmark", "backend", "contender", "median", "ratio", "vs", "samples")]
    order = {name: index for index, name in enumerate(dict.fromkeys(
        figure.benchmark for figure in results.figures))}
    for figure in sorted(results.figures, key=lambda figure: order[figure.benchmark]):
        ratio = "" if figure.ratio is None else f"{figure.ratio:.2f}x"
        samples = ", ".join(_value(s, figure.unit).split(" ")[0] for s in figure.samples)
        rows.append((
            figure.benchmark,
            figure.backend,
            figure.contender,
            _value(figure.median, figure.unit),
            ratio,
            figure.baseline or ("baseline" if figure.ratio == 1.0 else ""),
            samples + (f"  [{figure.note}]" if figure.note else ""),
        ))
    return _aligned(rows)


def targets_table(results: Results) -> str:
    rows = [("benchmark", "backend", "target", "measured", "", "by")]
    for target in results.targets:
        margin = target.value / target.limit if target.limit else float("nan")
        rows.append((
            target.benchmark,
            target.backend,
            target.goal,
            _value(target.value, target.unit),
            target.verdict,
            f"{margin:.2f} of the limit",
        ))
    return _aligned(rows)


def _aligned(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def text(results: Results) -> str:
    parts = [figures_table(results), "", targets_table(results)]
    if results.notes:
        parts += ["", *(f"* {note}" for note in results.notes)]
    return "\n".join(parts)


def write_json(results: Results, path: Path, arguments: dict[str, Any],
               extra: dict[str, Any]) -> None:
    document = {
        "started": results.started,
        "arguments": arguments,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "figures": [figure.to_json() for figure in results.figures],
        "targets": [target.to_json() for target in results.targets],
        "notes": results.notes,
        **extra,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def write_chart(results: Results, path: Path) -> None:
    """One panel per benchmark: each contender's median per backend, targets as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(dict.fromkeys(figure.benchmark for figure in results.figures))
    if not benchmarks:
        return
    fig, axes = plt.subplots(len(benchmarks), 1, figsize=(10, 2.6 * len(benchmarks)),
                             squeeze=False)
    for axis, benchmark in zip(axes[:, 0], benchmarks, strict=True):
        figures = [f for f in results.figures if f.benchmark == benchmark]
        _panel(axis, benchmark, figures)
        for target in results.targets:
            if target.benchmark == benchmark and target.unit == figures[0].unit:
                value = target.limit * (1000 if target.unit == "s" else 1)
                axis.axvline(value, color="red", linestyle="--", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panel(axis: Any, benchmark: str, figures: list[Figure]) -> None:
    unit = figures[0].unit
    scale = 1000 if unit == "s" else 1
    labels = [f"{f.backend} · {f.contender}" for f in figures]
    values = [f.median * scale for f in figures]
    colours = ["tab:orange" if "mandrill" in f.contender or "held" in f.contender
               or "RSS" in f.contender else "tab:gray" for f in figures]
    bars = axis.barh(labels, values, color=colours)
    for bar, figure in zip(bars, figures, strict=True):
        note = f"  {figure.ratio:.2f}x" if figure.ratio not in (None, 1.0) else ""
        axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                  f" {_value(figure.median, unit)}{note}", va="center", fontsize=7)
    axis.invert_yaxis()
    axis.set_title(f"{benchmark} ({'ms' if unit == 's' else unit})", fontsize=9, loc="left")
    axis.tick_params(labelsize=7)
    axis.margins(x=0.35)
