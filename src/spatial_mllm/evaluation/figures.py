"""The comparison's figures (PNG, Agg): accuracy with 95% interval error bars and the blind-control and text-ceiling
levels drawn, accuracy against visual tokens, the paired differences against the baseline, and accuracy by the 3x3
image region of the object asked about. Each function draws one figure from a `Comparison` into `path`."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .arms import BLIND, Arm, Estimate, grid_cell
from .comparison import Comparison
from .runs import OVERALL

BLIND_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.5}
CEILING_STYLE = {"color": "black", "linestyle": ":", "linewidth": 1.8}


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever backend pyplot may be set to
    return figure


def _error(found: Estimate) -> tuple[float, float]:
    """Distances from the value to its interval's ends, in percent (for errorbar's yerr)."""
    return (100 * (found.value - found.interval.low), 100 * (found.interval.high - found.value))


def _label(arm: Arm) -> str:
    label = arm.name if arm.name == arm.projector else f"{arm.name} ({arm.projector})"
    return label + (f", {len(arm.runs)} seeds" if len(arm.runs) > 1 else "")


def plot_accuracy_by_level(comparison: Comparison, kind: str, path: Path) -> None:
    """Grouped bars per level of `kind` ("categories" or "groups") and overall, one bar per sighted arm, with 95%
    interval error bars; the blind control and the text ceiling as short level lines over each group of bars."""
    levels = [*getattr(comparison, kind), OVERALL]
    arms = [arm for arm in comparison.arms if arm.role != BLIND]
    figure = _new_figure(max(6.0, 1.1 * len(levels) + 2.5), 5.0)
    axes = figure.subplots()
    width = 0.8 / max(1, len(arms))
    for offset, arm in enumerate(arms):
        found = [_level(arm.accuracy, kind, level) for level in levels]
        positions = [index - 0.4 + width * (offset + 0.5) for index in range(len(levels))]
        values = [100 * e.value if e else math.nan for e in found]
        errors = [_error(e) if e else (0.0, 0.0) for e in found]
        axes.bar(positions, values, width, label=_label(arm),
                 yerr=list(zip(*errors)), capsize=2, error_kw={"elinewidth": 1})  # fmt: skip
    blind = comparison.arm(comparison.blind) if comparison.blind else None
    levels_of = [("blind control", blind.accuracy if blind else {}, BLIND_STYLE),
                 ("text ceiling", comparison.ceiling_accuracy, CEILING_STYLE)]  # fmt: skip
    for label, accuracy, style in levels_of:
        for index, level in enumerate(levels):
            if found := _level(accuracy, kind, level):
                axes.hlines(100 * found.value, index - 0.45, index + 0.45, **style, label=label)
                label = None  # one legend entry
    axes.set_xticks(range(len(levels)), levels, rotation=30, ha="right")
    axes.set_ylabel("accuracy (%), 95% interval")
    axes.set_ylim(0, 105)
    axes.set_title(f"Accuracy per {'category' if kind == 'categories' else 'category group'}")
    # outside the axes, so that no bar near 100% hides under it
    figure.legend(loc="outside lower center", ncols=min(len(arms) + 2, 3), fontsize="small")
    figure.savefig(path, dpi=100, format="png")


def _level(accuracy: dict[str, dict[str, Estimate]], kind: str, level: str) -> Estimate | None:
    return accuracy.get(OVERALL if level == OVERALL else kind, {}).get(level)


def plot_accuracy_vs_tokens(comparison: Comparison, path: Path) -> None:
    """Overall accuracy (95% interval) against visual tokens per image; blind control and text ceiling as lines."""
    figure = _new_figure(6.5, 4.5)
    axes = figure.subplots()
    for arm in comparison.arms:
        if arm.role == BLIND:
            axes.axhline(100 * arm.overall.value, **BLIND_STYLE, label=f"blind control ({arm.name})")
            continue
        low, high = _error(arm.overall)
        axes.errorbar([arm.visual_tokens], [100 * arm.overall.value], yerr=[[low], [high]], fmt="o", capsize=3)
        axes.annotate(arm.name, (arm.visual_tokens, 100 * arm.overall.value), textcoords="offset points",
                      xytext=(6, 4), fontsize=8)  # fmt: skip
    if found := comparison.ceiling_accuracy.get(OVERALL, {}).get(OVERALL):
        axes.axhline(100 * found.value, **CEILING_STYLE, label="text ceiling")
    axes.set_xlabel("visual tokens per image")
    axes.set_ylabel("overall accuracy (%), 95% interval")
    axes.set_ylim(0, 105)
    axes.set_title("Accuracy against visual tokens")
    axes.grid(alpha=0.3)
    if comparison.blind or comparison.text_ceiling:
        axes.legend(fontsize="small", loc="lower right")
    figure.savefig(path, dpi=100, format="png")


def plot_differences(comparison: Comparison, path: Path) -> None:
    """Each projector minus the baseline, per level, with its 95% interval; filled markers where significant."""
    rows = list(comparison.versus_baseline)
    figure = _new_figure(7.0, max(3.0, 0.35 * len(rows) + 1.5))
    axes = figure.subplots()
    arms = list(dict.fromkeys(versus.arm for versus in rows))
    colors = {arm: f"C{index % 10}" for index, arm in enumerate(arms)}
    for position, versus in enumerate(reversed(rows)):
        interval = versus.interval
        color = colors[versus.arm]
        axes.hlines(position, 100 * interval.low, 100 * interval.high, color=color, linewidth=2)
        axes.plot([100 * versus.difference], [position], "o", color=color,
                  markerfacecolor=color if versus.significant else "white")  # fmt: skip
    axes.axvline(0, color="black", linewidth=1)
    axes.set_yticks(range(len(rows)), [f"{v.arm}: {v.level}" for v in reversed(rows)], fontsize=8)
    axes.set_xlabel(f"accuracy minus {comparison.baseline}'s (points), 95% interval; filled: significant (Holm)")
    axes.set_title(f"Against the baseline {comparison.baseline}, question by question")
    axes.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=100, format="png")


def plot_regions(comparison: Comparison, path: Path) -> None:
    """One 3x3 heatmap per arm: accuracy on the questions whose object lies in each region, with the count."""
    arms = list(comparison.arms)
    columns = min(4, len(arms))
    rows = math.ceil(len(arms) / columns)
    figure = _new_figure(3.0 * columns + 1.0, 3.0 * rows + 0.6)
    grid = figure.subplots(rows, columns, squeeze=False)
    image = None
    for index, axes in enumerate(grid.flat):
        if index >= len(arms):
            axes.set_axis_off()
            continue
        arm = arms[index]
        found = arm.accuracy["regions"]
        values = [[math.nan] * 3 for _ in range(3)]
        for region in comparison.regions:
            row, column = grid_cell(region)
            if region in found:
                values[row][column] = 100 * found[region].value
                n = found[region].total
                text = f"{100 * found[region].value:.0f}%" + (f"\nn={n}" if n is not None else "")
                axes.text(column, row, text, ha="center", va="center", fontsize=8,
                          color="white" if found[region].value < 0.6 else "black")  # readable on viridis
        image = axes.imshow(values, vmin=0, vmax=100, cmap="viridis")
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(arm.name + (" (blind)" if arm.role == BLIND else ""), fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=grid, shrink=0.8, label="accuracy (%)")
    figure.suptitle("Accuracy by the image region of the object asked about")
    figure.savefig(path, dpi=100, format="png")
