"""The comparison report: report.md (tables with 95% intervals, paired tests, seeds, regions, the papers' claims),
report.json (`Comparison.to_dict()`) and PNG figures, written into one folder.

`write_report(comparison_or_runs, out_dir)` takes a `Comparison` (from `comparison.compare_runs`) or the run dicts
themselves. Each file appears whole (written beside, then renamed); files of an earlier report in the folder are
replaced only with `overwrite=True`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import write_file, write_json, write_text
from . import figures
from .arms import BASELINE, BLIND, Arm, Estimate, grid_cell
from .comparison import Comparison, compare_runs
from .paired import Versus
from .runs import OVERALL
from .statistics import SIGNIFICANCE

MISSING = "—"
REPORT_FILES = {
    "markdown": "report.md",
    "json": "report.json",
    "accuracy_by_group": "accuracy_by_group.png",
    "accuracy_by_category": "accuracy_by_category.png",
    "accuracy_vs_visual_tokens": "accuracy_vs_visual_tokens.png",
    "differences_vs_baseline": "differences_vs_baseline.png",
    "accuracy_by_region": "accuracy_by_region.png",
}


def write_report(
    comparison: Comparison | Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    **compare_options: Any,
) -> dict[str, Path]:
    """Write the report files into out_dir; returns their paths by key (REPORT_FILES; figures that do not apply,
    such as differences without a baseline, are left out). Given run dicts, compares them first with
    `compare_runs(runs, **compare_options)`."""
    if not isinstance(comparison, Comparison):
        comparison = compare_runs(comparison, **compare_options)
    elif compare_options:
        raise TypeError(f"options {sorted(compare_options)} apply to run dicts, not to a Comparison")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder; the report needs a folder")
    existing = [name for name in REPORT_FILES.values() if (out_dir / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a report ({', '.join(existing)}); choose another folder or overwrite "
            "(--overwrite) to replace it"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = _figures(comparison)
    paths = {key: out_dir / REPORT_FILES[key] for key in ("markdown", "json", *drawn)}
    for key, draw in drawn.items():
        write_file(paths[key], draw)
    write_json(paths["json"], comparison.to_dict())
    write_text(paths["markdown"], render_markdown(comparison, {key: path.name for key, path in paths.items()}))
    for key, name in REPORT_FILES.items():  # a figure of the earlier report that this one does not draw
        if key not in paths and (out_dir / name).exists():
            (out_dir / name).unlink()
    return paths


def _figures(comparison: Comparison) -> dict[str, Any]:
    drawn = {
        "accuracy_by_group": lambda path: figures.plot_accuracy_by_level(comparison, "groups", path),
        "accuracy_by_category": lambda path: figures.plot_accuracy_by_level(comparison, "categories", path),
        "accuracy_vs_visual_tokens": lambda path: figures.plot_accuracy_vs_tokens(comparison, path),
    }
    if comparison.versus_baseline:
        drawn["differences_vs_baseline"] = lambda path: figures.plot_differences(comparison, path)
    if comparison.regions and all(grid_cell(region) for region in comparison.regions):
        drawn["accuracy_by_region"] = lambda path: figures.plot_regions(comparison, path)
    return drawn


# --- Markdown -----------------------------------------------------------------------------------------------------


def render_markdown(comparison: Comparison, files: Mapping[str, str] | None = None) -> str:
    """The whole report.md; `files` maps figure keys to the file names to embed."""
    files = files or {}
    sections = [
        "# Projector comparison",
        _setup(comparison),
        "## Runs\n\n" + facts_table(comparison),
        "## Accuracy by category group\n\n" + accuracy_table(comparison, "groups") + _figure(files, "accuracy_by_group"),
        "## Accuracy by category\n\n" + accuracy_table(comparison, "categories")
        + _figure(files, "accuracy_by_category") + _figure(files, "accuracy_vs_visual_tokens"),
    ]
    if len(comparison.types) > 1:  # one format would repeat the overall column
        sections.append(
            "## Accuracy by question format\n\n"
            "As the answer key poses each question: short answer (a word or phrase), multiple choice (mc: the "
            "option's letter, so the model must also find which option holds its answer) or yes/no.\n\n"
            + accuracy_table(comparison, "types")
        )
    if comparison.baseline:
        sections.append(
            f"## Against the baseline {comparison.baseline}, question by question\n\n"
            + _versus_section(comparison, comparison.versus_baseline, "baseline")
            + _figure(files, "differences_vs_baseline")
        )
    if comparison.blind:
        sections.append(
            f"## Against the blind control {comparison.blind}: does each model read the image?\n\n"
            + _versus_section(comparison, comparison.versus_blind, "blind control")
        )
    if comparison.seeded:
        sections.append("## Seeds\n\n" + seeds_section(comparison))
    sections.append(f"## Best overall\n\n{_sentence(comparison.ranking.reason)}")
    if comparison.regions:
        sections.append(
            "## Accuracy by image region of the object asked about\n\n" + region_table(comparison)
            + _figure(files, "accuracy_by_region")
        )
    sections.append("## The papers' claims, as measured here\n\n" + claims_section(comparison))
    if comparison.notes:
        sections.append("## Notes\n\n" + "\n".join(f"- {_sentence(note)}" for note in comparison.notes))
    return "\n\n".join(section.rstrip() for section in sections) + "\n"


def _setup(comparison: Comparison) -> str:
    totals = {arm.overall.total for arm in comparison.arms}
    questions = "questions per run vary"
    if len(totals) == 1 and None not in totals:
        questions = f"{totals.pop()} questions per run"
    same = "the same questions for every run"
    if not comparison.same_questions:
        same = "**not the same questions**: no ranking or paired tests"
    lines = [f"Benchmark: {comparison.benchmark or 'unnamed'}; {questions}, {same}."]
    roles = [f"Baseline: {comparison.baseline or 'none'}."]
    if comparison.blind:
        roles.append(f"Blind control: {comparison.blind} (same recipe, every image replaced by another sample's).")
    if comparison.text_ceiling:
        ceiling = comparison.text_ceiling
        roles.append(f"Text ceiling: {ceiling.model} ({ceiling.condition}).")
    lines.append(" ".join(roles))
    seeds = (
        " With several seeds per arm: the mean across seeds ± its standard deviation, and the Student t 95% interval "
        "of the mean."
        if comparison.seeded
        else ""
    )
    lines.append(
        "Accuracy in %, with its 95% interval in brackets (Wilson score for one run)." + seeds
        + f" Paired tests: exact McNemar on the questions both runs answered, significant when p < {SIGNIFICANCE} "
        "after Holm's correction (per table and seed, the overall tests as one family and the group tests as "
        "another); differences with Newcombe's paired 95% interval."
    )
    return "\n".join(lines)


def facts_table(comparison: Comparison) -> str:
    with_gain = any(run.image_gain is not None for arm in comparison.arms for run in arm.runs)
    header = ["Arm", "Projector", "Role", "Seeds", "Visual tokens", "Projector params", "Latency (ms/sample)", "Tokens/s"]
    header += ["Image gain (nats/token)"] * with_gain + ["Questions"]
    lines = _header(header, left=3)
    for arm in comparison.arms:
        params = arm.mean("projector_parameters")
        cells = [
            arm.name,
            arm.projector,
            arm.role,
            ", ".join(MISSING if seed is None else str(seed) for seed in arm.seeds),
            str(arm.visual_tokens),
            MISSING if params is None else f"{round(params):,}",
            _optional(arm.mean("latency_ms_per_sample"), ".1f"),
            _optional(arm.mean("tokens_per_second"), ".1f"),
        ]
        if with_gain:
            cells.append(_image_gain(arm))
        cells.append(_optional(arm.overall.total, "d"))
        lines.append(_row(cells))
    note = ""
    if with_gain:
        note = (
            "\n\nImage gain: how much lower the loss per supervised token is with each sample's own image than with "
            "another sample's (± standard error; across seeds ± standard deviation); 0 means the model ignores the "
            "image."
        )
    return "\n".join(lines) + note


def _image_gain(arm: Arm) -> str:
    gains = [run.image_gain for run in arm.runs if run.image_gain is not None]
    if not gains:
        return MISSING
    if len(gains) == 1:
        run = next(run for run in arm.runs if run.image_gain is not None)
        return with_error(run.image_gain, run.image_gain_se)
    mean = sum(gains) / len(gains)
    return with_error(mean, math.sqrt(sum((gain - mean) ** 2 for gain in gains) / (len(gains) - 1)))


def with_error(value: float, error: float) -> str:
    """`value ± error` with enough decimals to show the error's first digit (at least 3, at most 6)."""
    decimals = 3 if error <= 0 else min(6, max(3, 1 - math.floor(math.log10(error))))
    return f"{value:.{decimals}f} ± {error:.{decimals}f}"


def accuracy_table(comparison: Comparison, kind: str) -> str:
    """One row per arm (blind control included), then the text ceiling; columns overall and each level of `kind`."""
    levels = list(getattr(comparison, kind))
    lines = _header(["Arm", "Overall", *levels], left=1)
    counts = not comparison.same_questions
    for arm in comparison.arms:
        name = arm.name + (" (blind control)" if arm.role == BLIND else " (baseline)" if arm.role == BASELINE else "")
        cells = [cell(arm.overall, counts)] + [cell(arm.accuracy[kind].get(level), counts) for level in levels]
        lines.append(_row([name, *cells]))
    if comparison.text_ceiling:
        ceiling = comparison.ceiling_accuracy
        cells = [cell(ceiling.get(kind, {}).get(level), True) for level in levels]
        lines.append(_row(["text ceiling", cell(ceiling[OVERALL][OVERALL], True), *cells]))
    return "\n".join(lines)


def cell(found: Estimate | None, counts: bool = False) -> str:
    """62.5 [48.1, 75.0], or with seeds 62.5 ± 3.1 [54.7, 70.3]; with counts: 62.5 [48.1, 75.0] (25/40)."""
    if found is None:
        return MISSING
    spread = f" ± {100 * found.sd:.1f}" if found.sd is not None else ""
    text = f"{100 * found.value:.1f}{spread} [{100 * found.interval.low:.1f}, {100 * found.interval.high:.1f}]"
    if counts and found.correct is not None:
        text += f" ({found.correct}/{found.total})"
    return text


def _versus_section(comparison: Comparison, rows: Sequence[Versus], reference: str) -> str:
    if not rows:
        return f"No paired tests: {comparison.unpaired or 'no run to compare'}."
    seeded = any(len(versus.tests) > 1 for versus in rows)
    header = ["Arm", "Level", "Questions", f"{reference.capitalize()} acc.", "Arm acc.", "Difference [95% interval]"]
    header += ["Significant seeds"] if seeded else ["Only arm right / only reference right", "p", "p (Holm)"]
    header += ["Verdict"]
    lines = _header(header, left=2)
    for versus in rows:
        first = versus.tests[0]
        reference_acc = sum(t.table.correct_b / t.table.total for t in versus.tests) / len(versus.tests)
        arm_acc = sum(t.table.correct_a / t.table.total for t in versus.tests) / len(versus.tests)
        cells = [versus.arm, versus.level, str(first.table.total), f"{100 * reference_acc:.1f}", f"{100 * arm_acc:.1f}",
                 difference_cell(versus)]  # fmt: skip
        if seeded:
            cells.append(f"{versus.significant_seeds} of {len(versus.tests)}")
        else:
            cells += [f"{first.table.only_a} / {first.table.only_b}", _p(first.p_value), _p(first.p_adjusted)]
        cells.append(f"**{versus.verdict}**" if versus.significant else versus.verdict)
        lines.append(_row(cells))
    return "\n".join(lines)


def difference_cell(versus: Versus) -> str:
    interval = versus.interval
    return f"{100 * versus.difference:+.1f} [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]"


def seeds_section(comparison: Comparison) -> str:
    """Accuracy per seed for each arm and level, then every paired test per seed."""
    kinds = [(OVERALL, OVERALL), *(("groups", group) for group in comparison.groups)]
    seeds = sorted({seed for arm in comparison.arms for seed in arm.seeds if seed is not None})
    lines = _header(["Arm", "Level", "Mean ± sd", *(f"seed {seed}" for seed in seeds)], left=2)
    for arm in comparison.arms:
        for kind, level in kinds:
            found = arm.accuracy[kind].get(level)
            if found is None:
                continue
            per_seed = dict(zip(arm.seeds, found.per_seed or (found.value,)))
            values = [f"{100 * per_seed[seed]:.1f}" if seed in per_seed else MISSING for seed in seeds]
            spread = f"{100 * found.value:.1f}" + (f" ± {100 * found.sd:.1f}" if found.sd is not None else "")
            lines.append(_row([arm.name, level, spread, *values]))
    tests = [(versus, test) for versus in (*comparison.versus_baseline, *comparison.versus_blind) for test in versus.tests]
    if tests:
        lines += ["", "Paired tests per seed:", ""]
        header = ["Arm", "Reference", "Level", "Seed", "Difference [95% interval]", "p (Holm)", "Significant"]
        lines += _header(header, left=3)
        for versus, test in tests:
            interval = f"{100 * test.difference:+.1f} [{100 * test.interval.low:+.1f}, {100 * test.interval.high:+.1f}]"
            lines.append(_row([versus.arm, versus.reference, versus.level, str(test.seed), interval,
                               _p(test.p_adjusted), "yes" if test.significant else "no"]))  # fmt: skip
    return "\n".join(lines)


def region_table(comparison: Comparison) -> str:
    regions = list(comparison.regions)
    lines = _header(["Arm", *regions], left=1)
    for arm in comparison.arms:
        cells = []
        for region in regions:
            found = arm.accuracy["regions"].get(region)
            cells.append(MISSING if found is None else f"{100 * found.value:.1f} (n={_optional(found.total, 'd')})")
        lines.append(_row([arm.name, *cells]))
    return "\n".join(lines) + (
        "\n\nThe region is that of the centre of the object the question asks about (for relations, the first object "
        "named); counting questions and questions about no single object are left out. n: questions per run."
    )


def claims_section(comparison: Comparison) -> str:
    lines = []
    for claim in comparison.claims:
        subject = f" ({claim.arm})" if claim.arm else ""
        lines.append(f"- **{claim.paper}**{subject}: *{claim.claim}.* {_sentence(claim.finding)}")
    return "\n".join(lines)


def _figure(files: Mapping[str, str], key: str) -> str:
    return f"\n\n![{key.replace('_', ' ')}]({files[key]})" if key in files else ""


def _header(names: Sequence[str], left: int) -> list[str]:
    align = ["---"] * left + ["---:"] * (len(names) - left)
    return [_row(names), "|" + "|".join(align) + "|"]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _optional(value: float | int | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _sentence(text: str) -> str:
    return text if text.endswith(".") else text + "."
