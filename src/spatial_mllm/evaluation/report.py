"""Comparison report over evaluation runs: a Markdown table, a JSON summary and two PNG plots.

Each run is one dict (e.g. `score_answers(...)` merged with the run's facts):
  name (str, unique), projector (str), visual_tokens (int), overall (accuracy), categories ({name: accuracy}),
  optional projector_parameters (int), latency_ms_per_sample (float), tokens_per_second (float), image_reliance
  (`ImageReliance.to_dict()`: the loss gap between own and other images, shown with its standard error).
Accuracies are fractions in [0, 1]; the table and the plots show percentages. Other keys are ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .records import require_field, require_text

MISSING = "—"
OVERALL_LABEL = "overall"


@dataclass(frozen=True)
class RunSummary:
    name: str
    projector: str
    visual_tokens: int
    overall: float
    categories: dict[str, float]
    projector_parameters: int | None = None
    latency_ms_per_sample: float | None = None
    tokens_per_second: float | None = None
    image_gain: float | None = None  # nats per supervised token the model gains from its own image (image_reliance)
    image_gain_se: float | None = None


def read_run(result: Mapping[str, Any], where: str) -> RunSummary:
    """Check one run's dict and keep what the report shows."""
    categories = require_field(result, "categories", where)
    if not isinstance(categories, Mapping) or not categories:
        raise ValueError(f"{where}: field 'categories' must be a non-empty object of category -> accuracy")
    return RunSummary(
        name=require_text(result, "name", where),
        projector=require_text(result, "projector", where),
        visual_tokens=_count(result, "visual_tokens", where, minimum=1),
        overall=_accuracy(require_field(result, "overall", where), f"{where}, field 'overall'"),
        categories={
            str(name): _accuracy(value, f"{where}, category {name!r}") for name, value in categories.items()
        },
        projector_parameters=(
            _count(result, "projector_parameters", where, minimum=0)
            if result.get("projector_parameters") is not None
            else None
        ),
        latency_ms_per_sample=_optional_positive(result, "latency_ms_per_sample", where),
        tokens_per_second=_optional_positive(result, "tokens_per_second", where),
        **_image_gain(result, where),
    )


def _image_gain(result: Mapping[str, Any], where: str) -> dict[str, float]:
    reliance = result.get("image_reliance")
    if reliance is None:
        return {}
    if not isinstance(reliance, Mapping):
        raise ValueError(f"{where}: field 'image_reliance' must be an object (ImageReliance.to_dict()), got {reliance!r}")
    gain, error = reliance.get("gap"), reliance.get("gap_standard_error")
    if not _is_number(gain) or not _is_number(error) or error < 0:
        raise ValueError(
            f"{where}: field 'image_reliance' needs numbers 'gap' and 'gap_standard_error' >= 0, got {gain!r}, {error!r}"
        )
    return {"image_gain": float(gain), "image_gain_se": float(error)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _accuracy(value: Any, where: str) -> float:
    if not _is_number(value):
        raise ValueError(f"{where}: accuracy must be a number, got {value!r}")
    if not 0 <= value <= 1:
        hint = " (accuracies are fractions; divide percentages by 100)" if 1 < value <= 100 else ""
        raise ValueError(f"{where}: accuracy must lie in [0, 1], got {value!r}{hint}")
    return float(value)


def _count(result: Mapping[str, Any], field: str, where: str, minimum: int) -> int:
    value = require_field(result, field, where)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: field {field!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _optional_positive(result: Mapping[str, Any], field: str, where: str) -> float | None:
    value = result.get(field)
    if value is None:
        return None
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{where}: field {field!r} must be a positive number, got {value!r}")
    return float(value)


def read_runs(results: list[Mapping[str, Any]]) -> list[RunSummary]:
    """All runs, checked; names must be unique since they label rows, bars and points."""
    if not results:
        raise ValueError("no evaluation results to report")
    runs = [read_run(result, f"result {index}") for index, result in enumerate(results)]
    seen: set[str] = set()
    for index, run in enumerate(runs):
        if run.name in seen:
            raise ValueError(f"result {index}: name {run.name!r} is used by an earlier result; names must differ")
        seen.add(run.name)
    return runs


def category_names(runs: list[RunSummary]) -> list[str]:
    """Every category any run reports, sorted."""
    return sorted({name for run in runs for name in run.categories})


def _percent(accuracy: float | None) -> str:
    return MISSING if accuracy is None else f"{accuracy * 100:.1f}"


def _optional(value: float | int | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def markdown_table(runs: list[RunSummary]) -> str:
    """One row per run: its facts, overall accuracy and accuracy per category (in %)."""
    categories = category_names(runs)
    with_gain = any(run.image_gain is not None for run in runs)
    header = ["Run", "Projector", "Visual tokens", "Projector params", "Latency (ms/sample)", "Tokens/s"]
    header += ["Image gain (nats/token)"] * with_gain + ["Overall"] + categories
    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for run in runs:
        cells = [
            run.name,
            run.projector,
            str(run.visual_tokens),
            _optional(run.projector_parameters, ","),
            _optional(run.latency_ms_per_sample, ".1f"),
            _optional(run.tokens_per_second, ".1f"),
        ]
        if with_gain:
            cells.append(MISSING if run.image_gain is None else _with_error(run.image_gain, run.image_gain_se))
        cells.append(_percent(run.overall))
        cells += [_percent(run.categories.get(category)) for category in categories]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_error(value: float, error: float) -> str:
    """`value ± error` with enough decimals to show the error's first digit (at least 3, at most 6)."""
    decimals = 3 if error <= 0 else min(6, max(3, 1 - math.floor(math.log10(error))))
    return f"{value:.{decimals}f} ± {error:.{decimals}f}"


def _gain_note(runs: list[RunSummary]) -> str:
    if all(run.image_gain is None for run in runs):
        return ""
    return (
        " Image gain: how much lower the loss per supervised token is with each sample's own image than with another"
        " sample's (± standard error); 0 means the model ignores the image."
    )


def _best_overall(runs: list[RunSummary]) -> RunSummary:
    return max(runs, key=lambda run: run.overall)


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever backend pyplot may be set to
    return figure


def plot_accuracy_by_category(runs: list[RunSummary], path: Path) -> None:
    """Grouped bars: for each category (and overall), one bar per run."""
    groups = category_names(runs) + [OVERALL_LABEL]
    figure = _new_figure(max(6.0, 1.2 * len(groups) + 2.0), 5.0)
    axes = figure.subplots()
    bar_width = 0.8 / len(runs)
    for offset, run in enumerate(runs):
        values = [run.categories.get(group, math.nan) if group != OVERALL_LABEL else run.overall for group in groups]
        positions = [index - 0.4 + bar_width * (offset + 0.5) for index in range(len(groups))]
        axes.bar(positions, [value * 100 for value in values], bar_width, label=f"{run.name} ({run.projector})")
    axes.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title("Accuracy per category")
    # outside the axes, so that no bar near 100% hides under it
    figure.legend(loc="outside lower center", ncols=min(len(runs), 3), fontsize="small")
    figure.savefig(path, dpi=100)


def plot_accuracy_vs_tokens(runs: list[RunSummary], path: Path) -> None:
    """Overall accuracy against visual tokens per image, each point labelled with its run."""
    figure = _new_figure(6.0, 4.5)
    axes = figure.subplots()
    axes.scatter([run.visual_tokens for run in runs], [run.overall * 100 for run in runs])
    for run in runs:
        axes.annotate(
            run.name, (run.visual_tokens, run.overall * 100), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    axes.set_xlabel("visual tokens per image")
    axes.set_ylabel("overall accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title("Accuracy against visual tokens")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


def write_report(results: list[Mapping[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json, accuracy_by_category.png and accuracy_vs_visual_tokens.png into out_dir.

    Returns their paths under the keys "markdown", "json", "accuracy_by_category", "accuracy_vs_visual_tokens".
    """
    runs = read_runs(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md",
        "json": out_dir / "report.json",
        "accuracy_by_category": out_dir / "accuracy_by_category.png",
        "accuracy_vs_visual_tokens": out_dir / "accuracy_vs_visual_tokens.png",
    }
    best = _best_overall(runs)
    paths["markdown"].write_text(
        "# Projector comparison\n\n"
        f"{markdown_table(runs)}\n\n"
        f"Accuracy in %. Best overall: {best.name} ({_percent(best.overall)}).{_gain_note(runs)}\n\n"
        f"![accuracy per category]({paths['accuracy_by_category'].name})\n\n"
        f"![accuracy against visual tokens]({paths['accuracy_vs_visual_tokens'].name})\n",
        encoding="utf-8",
    )
    summary = {
        "accuracy_unit": "fraction",
        "categories": category_names(runs),
        "best_overall": best.name,
        "runs": [asdict(run) for run in runs],
    }
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_accuracy_by_category(runs, paths["accuracy_by_category"])
    plot_accuracy_vs_tokens(runs, paths["accuracy_vs_visual_tokens"])
    return paths
