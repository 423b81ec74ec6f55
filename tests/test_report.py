"""The comparison and its report on hand-made runs with known per-question outcomes: a significant and a
non-significant difference, ties and "best" withheld, refusal of runs scored on different questions, the blind
control and the text ceiling, accuracy by image region, seeds, the papers' claims, files and figures on disk, the
command line."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from PIL import Image

from spatial_mllm import cli
from spatial_mllm.demo.world.geometry import REGIONS
from spatial_mllm.evaluation.arms import grid_cell
from spatial_mllm.evaluation.comparison import compare_runs
from spatial_mllm.evaluation.metrics import accuracy_by_group, score_answers
from spatial_mllm.evaluation.report import REPORT_FILES, facts_table, write_report
from spatial_mllm.evaluation.text_ceiling import TextCeiling

Z = 1.959963984540054

# 120 questions: 20 per category; existence, count, attribute (color, shape), spatial (left_right, location).
CATEGORIES = [("existence", "existence"), ("count", "count"), ("color", "attribute"), ("shape", "attribute"),
              ("left_right", "spatial"), ("location", "spatial")]  # fmt: skip
QUESTIONS = [
    (f"q{i:03d}", category, group, None if category == "count" else REGIONS[i % 9])
    for i, (category, group) in enumerate(pair for pair in CATEGORIES for _ in range(20))
]
SPATIAL = {i for i, q in enumerate(QUESTIONS) if q[2] == "spatial"}
BASELINE_RIGHT = {i for i in range(120) if i % 2 == 0}  # 60 of 120, half of every category
SP_RIGHT = BASELINE_RIGHT | SPATIAL  # 20 more, all spatial: 80 of 120
SAEP_RIGHT = (BASELINE_RIGHT - {0}) | {1, 3, 5}  # 3 more, 1 fewer (existence): 62 of 120
BLIND_RIGHT = {i for i in range(120) if i % 4 == 0}  # 30 of 120


def scores(name, projector, right, tokens=64, **facts):
    """A scores file as `spatial-mllm eval --answer-key` writes it (score_answers merged with the run's facts)."""
    rows = [{"question_id": q, "category": c, "group": g, "region": r, "type": "short", "correct": i in right}
            for i, (q, c, g, r) in enumerate(QUESTIONS)]  # fmt: skip
    by_category = accuracy_by_group((row["category"], row["correct"]) for row in rows)
    by_group = accuracy_by_group((row["group"], row["correct"]) for row in rows)
    return {
        "name": name, "projector": projector, "visual_tokens": tokens, "projector_parameters": 1000 * tokens,
        "benchmark": "answer_key", "questions_file": "q.jsonl", "questions_sha256": "d1", "scores_version": 2,
        "overall": by_category["overall"], "categories": by_category["groups"], "groups": by_group["groups"],
        "counts": {"overall": by_category["counts"]["overall"], "categories": by_category["counts"]["groups"],
                   "groups": by_group["counts"]["groups"]},
        "per_question": rows, **facts,
    }  # fmt: skip


def ceiling(correct_per_category=18):
    """The text ceiling as the demo would write it: 18 of 20 right in every category."""
    sizes = {"existence": 1, "count": 1, "attribute": 2, "spatial": 2}  # categories per group
    return TextCeiling.from_dict({
        "model": "tiny-llama", "questions_sha256": "d1",
        "counts": {"overall": {"correct": 6 * correct_per_category, "total": 120},
                   "categories": {c: {"correct": correct_per_category, "total": 20} for c, _ in CATEGORIES},
                   "groups": {g: {"correct": n * correct_per_category, "total": 20 * n} for g, n in sizes.items()}},
    })  # fmt: skip


def wilson(k, n):
    p = k / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    return pytest.approx((centre - half, centre + half), abs=1e-12)


def binomial_p(k, n):
    """Two-sided exact p of k of n discordant questions going one way, written out."""
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n)


RUNS = [
    scores("mlp", "mlp2x_gelu", BASELINE_RIGHT),
    scores("sp", "llava_sp_pooling", SP_RIGHT, tokens=70, latency_ms_per_sample=12.0),
    scores("saep", "saep", SAEP_RIGHT, tokens=16),
    scores("blind", "mlp2x_gelu", BLIND_RIGHT, control="blind"),
]


def test_significant_and_non_significant_differences_against_the_baseline():
    comparison = compare_runs(RUNS, text_ceiling=ceiling())
    assert (comparison.baseline, comparison.blind, comparison.same_questions) == ("mlp", "blind", True)

    sp = comparison.versus("sp")  # overall: 20 questions only sp got right, none only mlp
    (test,) = sp.tests
    assert (test.table.only_a, test.table.only_b, test.table.total) == (20, 0, 120)
    assert test.p_value == pytest.approx(binomial_p(0, 20)) == pytest.approx(2**-19)
    assert test.p_adjusted == pytest.approx(2 * 2**-19)  # Holm over the 2 overall tests
    assert sp.difference == pytest.approx(20 / 120) and sp.verdict == "significantly higher"
    assert sp.interval.low > 0
    spatial = comparison.versus("sp", "spatial")  # 40 spatial questions: 20 of them only sp
    assert spatial.difference == pytest.approx(0.5) and spatial.verdict == "significantly higher"
    assert spatial.tests[0].p_adjusted == pytest.approx(8 * 2**-19)  # Holm over 2 arms x 4 groups, smallest p
    assert comparison.versus("sp", "existence").verdict == "no significant difference"

    saep = comparison.versus("saep")  # 3 only saep, 1 only mlp
    assert saep.tests[0].p_value == pytest.approx(binomial_p(1, 4)) == pytest.approx(0.625)
    assert saep.difference == pytest.approx(2 / 120) and saep.verdict == "no significant difference"
    assert saep.interval.low < 0 < saep.interval.high

    # Accuracies carry Wilson intervals; the baseline's overall is 60 of 120.
    overall = comparison.arm("mlp").overall
    assert (overall.correct, overall.total) == (60, 120)
    assert (overall.interval.low, overall.interval.high) == wilson(60, 120)

    # Best: sp against saep is 21 vs 3 discordant, against mlp 20 vs 0, both significant together with saep vs mlp.
    ranking = comparison.ranking
    assert ranking.best == "sp"
    assert {v.reference: v.tests[0].p_value for v in ranking.tests} == pytest.approx(
        {"mlp": binomial_p(0, 20), "saep": binomial_p(3, 24)}
    )


def test_blind_control_and_text_ceiling_levels_in_report_json(tmp_path):
    paths = write_report(compare_runs(RUNS, text_ceiling=ceiling()), tmp_path / "report")
    summary = json.loads(paths["json"].read_text())
    assert summary["blind_control"] == "blind"
    blind = next(arm for arm in summary["arms"] if arm["name"] == "blind")
    assert blind["role"] == "blind control"
    found = blind["accuracy"]["overall"]["overall"]
    assert (found["correct"], found["total"], found["value"]) == (30, 120, 0.25)
    assert (found["low"], found["high"]) == wilson(30, 120)
    text = summary["text_ceiling"]
    assert text["model"] == "tiny-llama" and text["counts"]["overall"] == {"correct": 108, "total": 120}
    level = text["accuracy"]["overall"]["overall"]
    assert level["value"] == 0.9 and (level["low"], level["high"]) == wilson(108, 120)
    assert text["accuracy"]["groups"]["spatial"]["value"] == 0.9
    # Each model against the blind control: the baseline has 30 questions right that blind missed, none the other way.
    against_blind = {(v["arm"], v["level"]): v for v in summary["versus_blind"]}
    baseline = against_blind[("mlp", "overall")]["tests"][0]
    assert (baseline["only_arm_right"], baseline["only_reference_right"]) == (30, 0)
    assert against_blind[("mlp", "overall")]["verdict"] == "significantly higher"
    assert ("blind", "overall") not in against_blind
    markdown = paths["markdown"].read_text()
    assert "| blind (blind control) | 25.0 [" in markdown
    assert "| text ceiling | 90.0 [" in markdown and "(108/120)" in markdown
    assert "## Against the blind control blind: does each model read the image?" in markdown


def test_tie_and_insignificant_lead_withhold_the_best():
    tie = compare_runs([scores("mlp", "mlp2x_gelu", BASELINE_RIGHT), scores("other", "ldpv2", BASELINE_RIGHT)])
    assert tie.ranking.best is None and "tie on overall accuracy (50.0%)" in tie.ranking.reason
    # Same accuracy on different questions is a tie too: 0 vs 0 difference, no ranking either way.
    swapped = (BASELINE_RIGHT - {0, 2}) | {1, 3}
    tie = compare_runs([scores("mlp", "mlp2x_gelu", BASELINE_RIGHT), scores("other", "ldpv2", swapped)])
    assert tie.ranking.best is None and "tie" in tie.ranking.reason
    lead = compare_runs([scores("mlp", "mlp2x_gelu", BASELINE_RIGHT), scores("saep", "saep", SAEP_RIGHT)])
    assert lead.ranking.best is None
    assert lead.ranking.reason.startswith("no best: saep has the highest overall accuracy (51.7%) but is not")
    only = compare_runs([scores("mlp", "mlp2x_gelu", BASELINE_RIGHT)])
    assert only.ranking.best is None and only.versus_baseline == ()


def test_runs_scored_on_different_questions_are_refused_or_shown_without_ranking(tmp_path):
    fewer = scores("sp", "llava_sp_pooling", SP_RIGHT, tokens=70)
    fewer["per_question"] = fewer["per_question"][:-10]  # eval skipped 10 lines
    tally = accuracy_by_group((row["category"], row["correct"]) for row in fewer["per_question"])
    fewer |= {"overall": tally["overall"], "categories": tally["groups"],
              "counts": {"overall": tally["counts"]["overall"], "categories": tally["counts"]["groups"]}}  # fmt: skip
    runs = [RUNS[0], fewer]
    with pytest.raises(ValueError) as refused:
        compare_runs(runs, sources=["mlp.scores.json", "sp.scores.json"])
    assert str(refused.value).startswith(
        "sp.scores.json was scored on 110 questions and mlp.scores.json on 120, not the same ones "
        "(only mlp.scores.json has 'q110', 'q111', 'q112', 'q113', 'q114' and 5 more); compare runs scored on the same"
    )
    mixed = compare_runs(runs, allow_mixed_questions=True)
    assert not mixed.same_questions
    assert mixed.ranking.best is None and mixed.ranking.reason.startswith("no ranking")
    assert mixed.versus_baseline == () and mixed.versus_blind == ()
    assert [claim.verdict for claim in mixed.claims] == [None, None]
    assert "not assessed: the runs were not scored on the same questions" in mixed.claims[0].finding
    markdown = write_report(mixed, tmp_path)["markdown"].read_text()
    assert "**not the same questions**: no ranking or paired tests" in markdown
    assert "(80/120)" not in markdown and "(70/110)" in markdown and "(60/120)" in markdown  # counts shown
    assert "No paired tests: the runs were not scored on the same questions." in markdown
    # another question file: refused by digest, as before
    other_file = {**RUNS[2], "questions_sha256": "d2", "questions_file": "other.jsonl"}
    with pytest.raises(ValueError, match="result 1 answered other.jsonl but result 0 answered q.jsonl, a different"):
        compare_runs([RUNS[0], other_file])
    with pytest.raises(ValueError, match="result 1 is scored as 'pope' but result 0 as 'answer_key'"):
        compare_runs([RUNS[0], {**RUNS[2], "benchmark": "pope"}], allow_mixed_questions=True)


def test_accuracy_by_region(tmp_path):
    # the world's region names map onto the 3x3 grid row by row; other names are not placed on it
    assert [grid_cell(region) for region in REGIONS] == [divmod(index, 3) for index in range(9)]
    assert grid_cell("upper left") is None and grid_cell("left top") is None
    comparison = compare_runs(RUNS)
    assert comparison.regions == REGIONS
    for arm, right in (("mlp", BASELINE_RIGHT), ("sp", SP_RIGHT)):
        for region in REGIONS:
            asked = [i for i, q in enumerate(QUESTIONS) if q[3] == region]
            found = comparison.arm(arm).accuracy["regions"][region]
            assert (found.correct, found.total) == (len([i for i in asked if i in right]), len(asked))
    # counting questions have no region: 100 of the 120 questions are placed
    assert sum(e.total for e in comparison.arm("mlp").accuracy["regions"].values()) == 100
    top_left = comparison.arm("sp").accuracy["regions"]["top left"]
    paths = write_report(comparison, tmp_path)
    markdown = paths["markdown"].read_text()
    header = "| Arm | top left | top | top right | left | center | right | bottom left | bottom | bottom right |"
    assert header in markdown
    assert f"| sp | {100 * top_left.value:.1f} (n={top_left.total}) |" in markdown
    assert "![accuracy by region](accuracy_by_region.png)" in markdown


def test_accuracy_by_question_format(tmp_path):
    """Every third question posed as multiple choice: each arm's and the text ceiling's accuracy per format, from
    per-question rows and from counts alone, in report.json and in the report's format table."""
    mc = {i for i in range(120) if i % 3 == 0}  # 40 questions

    def with_formats(run):
        rows = [{**row, "type": "mc" if i in mc else "short"} for i, row in enumerate(run["per_question"])]
        return {**run, "per_question": rows}

    runs = [with_formats(run) for run in RUNS]
    text = ceiling().to_dict()
    text["counts"]["types"] = {"short": {"correct": 78, "total": 80}, "mc": {"correct": 12, "total": 40}}
    comparison = compare_runs(runs, text_ceiling=text)
    assert comparison.types == ("mc", "short")  # in the order the questions first name them
    for arm, right in (("mlp", BASELINE_RIGHT), ("sp", SP_RIGHT), ("blind", BLIND_RIGHT)):
        found = comparison.arm(arm).accuracy["types"]
        assert (found["mc"].correct, found["mc"].total) == (len(right & mc), 40)
        assert (found["short"].correct, found["short"].total) == (len(right - mc), 80)
    assert (len(SP_RIGHT & mc), len(BLIND_RIGHT & mc)) == (27, 10)  # 67.5% and 25.0%
    counted = compare_runs([{k: v for k, v in run.items() if k != "per_question"}
                            | {"counts": {**run["counts"], "types": {"mc": {"correct": 27, "total": 40}}}}
                            for run in runs[1:2]])  # fmt: skip
    assert counted.arm("sp").accuracy["types"]["mc"].value == 27 / 40
    paths = write_report(comparison, tmp_path)
    summary = json.loads(paths["json"].read_text())
    assert summary["types"] == ["mc", "short"]
    assert summary["text_ceiling"]["accuracy"]["types"]["mc"]["value"] == 0.3
    markdown = paths["markdown"].read_text().split("## Accuracy by question format")[1].split("\n## ")[0]
    assert "| Arm | Overall | mc | short |" in markdown
    assert "| sp | 66.7 [" in markdown and "| 67.5 [" in markdown
    assert "| blind (blind control) | 25.0 [" in markdown
    assert "| text ceiling | 90.0 [" in markdown and "30.0 [" in markdown and "(12/40)" in markdown
    # runs of one format (RUNS: all short answer): no such section
    assert "## Accuracy by question format" not in write_report(compare_runs(RUNS[:2]), tmp_path / "plain")[
        "markdown"].read_text()


def test_seeds_mean_spread_and_paired_test_per_seed():
    runs = []
    for seed in range(3):
        baseline = BASELINE_RIGHT | {i for i in range(12 * seed) if i % 2}  # 60, 66, 72 right
        runs.append(scores(f"mlp/{seed}", "mlp2x_gelu", baseline, arm="mlp", seed=seed))
        runs.append(scores(f"sp/{seed}", "llava_sp_pooling", baseline | SPATIAL, tokens=70, arm="sp", seed=seed))
        saep = baseline | SPATIAL if seed == 0 else baseline  # better in one seed only
        runs.append(scores(f"saep/{seed}", "saep", saep, tokens=16, arm="saep", seed=seed))
    comparison = compare_runs(runs)
    assert [arm.name for arm in comparison.arms] == ["mlp", "sp", "saep"] and comparison.seeded
    mlp = comparison.arm("mlp").overall
    assert mlp.per_seed == pytest.approx((0.5, 0.55, 0.6))
    assert (mlp.value, mlp.sd) == pytest.approx((0.55, 0.05))
    half = 4.302652729749464 * 0.05 / math.sqrt(3)
    assert (mlp.interval.low, mlp.interval.high) == pytest.approx((0.55 - half, 0.55 + half))
    sp = comparison.versus("sp")
    assert [test.seed for test in sp.tests] == [0, 1, 2]
    assert all(test.significant and test.table.only_a == 20 for test in sp.tests)
    assert sp.verdict == "significantly higher" and sp.difference == pytest.approx(20 / 120)
    saep = comparison.versus("saep")
    assert [test.significant for test in saep.tests] == [True, False, False]
    assert saep.verdict == "not significant in every seed" and not saep.significant
    # sp equals saep in seed 0 (both right on every spatial question): not above it in every seed, so no best
    assert comparison.ranking.best is None and comparison.ranking.reason.endswith("more accurate than saep")
    assert comparison.versus("sp").tests[0].table.total == 120
    with pytest.raises(ValueError, match="result 1: arm 'mlp' has several runs, so each needs its own 'seed'; got 0 as"):
        compare_runs([runs[0], {**runs[3], "seed": 0}])


def test_the_papers_claims_as_measured():
    claims = {claim.paper: claim for claim in compare_runs(RUNS).claims}
    llava_sp = claims["LLaVA-SP"]
    assert (llava_sp.arm, llava_sp.level, llava_sp.verdict) == ("sp", "spatial", "significantly higher")
    assert llava_sp.finding.startswith("supported: +50.0 points against mlp on the spatial questions (95% interval +")
    assert "Cost: 70 visual tokens vs 64 (1.09x), projector parameters 1.1x." in llava_sp.finding
    saep = claims["SAEP"]
    assert (saep.arm, saep.level, saep.verdict) == ("saep", "overall", "no significant difference")
    assert saep.finding.startswith("no significant difference: +1.7 points against mlp on all questions")
    assert "16 visual tokens vs 64 (0.25x)" in saep.finding
    worse = compare_runs([RUNS[0], scores("saep", "saep", BASELINE_RIGHT - SPATIAL, tokens=16)]).claims
    assert worse[1].verdict == "significantly lower" and worse[1].finding.startswith("contradicted: -16.7 points")
    assert worse[0].finding == "not measured: no LLaVA-SP run in this comparison"


def test_report_files_figures_and_no_overwrite(tmp_path):
    out = tmp_path / "report"
    paths = write_report(RUNS, out, text_ceiling=ceiling())
    assert {key: path.name for key, path in paths.items()} == REPORT_FILES
    for key in REPORT_FILES:
        if key.endswith(("markdown", "json")):
            continue
        with Image.open(paths[key]) as image:
            image.verify()
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
            assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 10  # not a blank canvas
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES.values())  # no temporary files left
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"already holds a report \(report.md, report.json, accuracy_by_group.png"):
        write_report(RUNS[:2], out)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before
    # With overwrite, figures that no longer apply (no baseline: no differences) are removed with the rest.
    write_report([RUNS[1], RUNS[2]], out, overwrite=True)
    assert not (out / "differences_vs_baseline.png").exists() and (out / "accuracy_by_region.png").exists()
    assert "no baseline (mlp2x_gelu) among the runs" in (out / "report.md").read_text()


def test_old_scores_files_still_report():
    # scores version 1: per-question rows without group or region; groups fall back to the categories
    old = [{**run, "per_question": [{k: v for k, v in row.items() if k not in ("group", "region")}
                                    for row in run["per_question"]]} for run in RUNS[:2]]  # fmt: skip
    for run in old:
        del run["groups"], run["counts"]["groups"], run["scores_version"]
    comparison = compare_runs(old)
    assert comparison.groups == tuple(c for c, _ in CATEGORIES) and comparison.regions == ()
    assert comparison.versus("sp", "left_right").difference == pytest.approx(0.5)
    # counts only (no per-question rows, e.g. a hand-made summary): intervals, but no paired tests or best
    counted = [{k: v for k, v in run.items() if k != "per_question"} for run in RUNS[:2]]
    comparison = compare_runs(counted)
    assert comparison.arm("sp").overall.interval.low == wilson(80, 120).expected[0]
    assert comparison.versus_baseline == () and comparison.ranking.best is None
    assert "no per-question results (field 'per_question') in mlp, sp" in comparison.notes[0]


def test_report_from_score_answers_output(tmp_path):
    key = [
        {"question_id": 1, "answer": "left", "category": "left_right", "group": "spatial", "region": "top left",
         "type": "short"},
        {"question_id": 2, "answer": "yes", "category": "existence", "type": "yesno"},
    ]  # fmt: skip
    answers = [{"question_id": 1, "text": "left"}, {"question_id": 2, "text": "No"}]
    scored = score_answers(answers, key)
    assert scored["scores_version"] == 2 and scored["groups"] == {"existence": 0.0, "spatial": 1.0}
    assert [(row["group"], row["region"]) for row in scored["per_question"]] == [("spatial", "top left"), ("existence", None)]
    run = {"name": "tiny", "projector": "mlp2x_gelu", "visual_tokens": 16, **scored}
    markdown = write_report([run], tmp_path)["markdown"].read_text(encoding="utf-8")
    # groups in the order the key first names them: spatial (question 1), then existence
    assert "| tiny (baseline) | 50.0 [9.5, 90.5] | 100.0 [20.7, 100.0] | 0.0 [0.0, 79.3] |" in markdown


def test_image_gain_column():
    reliance = {"loss_own_images": 0.6724, "loss_other_images": 0.7327, "gap": 0.0603, "gap_standard_error": 0.0052}
    lines = facts_table(compare_runs([{**RUNS[0], "image_reliance": reliance}, RUNS[2]])).splitlines()
    assert lines[0] == ("| Arm | Projector | Role | Seeds | Visual tokens | Projector params | Latency (ms/sample) | Tokens/s"
                        " | Image gain (nats/token) | Questions |")  # fmt: skip
    assert lines[2] == "| mlp | mlp2x_gelu | baseline | — | 64 | 64,000 | — | — | 0.0603 ± 0.0052 | 120 |"
    assert lines[3] == "| saep | saep | projector | — | 16 | 16,000 | — | — | — | 120 |"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"overall": 62.5}, r"result 0, field 'overall': accuracy must lie in \[0, 1\], got 62.5 \(accuracies are"),
        ({"overall": 0.6}, r"result 0: field 'overall' is 0.6 but field 'per_question' has 60 of 120 right"),
        ({"categories": {"count": "high"}}, r"result 0, category 'count': accuracy must be a number"),
        ({"categories": {}}, r"result 0: field 'categories' must be a non-empty object"),
        ({"visual_tokens": 0}, r"result 0: field 'visual_tokens' must be an integer >= 1, got 0"),
        ({"latency_ms_per_sample": -1}, r"result 0: field 'latency_ms_per_sample' must be a positive number"),
        ({"name": "sp"}, r"result 1: run name 'sp' is also the name in result 0; names must differ"),
        ({"image_reliance": {"gap": 0.1}}, r"result 0: field 'image_reliance' needs numbers 'gap' and 'gap_standard_e"),
        ({"control": "deaf"}, r"result 0: field 'control' must be one of blind \(or absent\), got 'deaf'"),
        ({"per_question": [{"question_id": 1, "category": "c", "correct": "yes"}]},
         r"result 0, per_question row 0: field 'correct' must be true/false or 1/0, got 'yes'"),
        ({"per_question": None, "counts": None}, r"result 0: missing field 'counts' \(right answers and questions per"),
    ],
)  # fmt: skip
def test_bad_results_are_named(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        write_report([{**RUNS[0], **change}, RUNS[1]], tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_baseline_choice():
    assert compare_runs(RUNS, baseline="saep").baseline == "saep"
    assert compare_runs(RUNS, baseline="llava_sp_pooling").baseline == "sp"  # by projector
    with pytest.raises(ValueError, match="baseline 'nope' is neither the name nor the projector of a run"):
        compare_runs(RUNS, baseline="nope")
    two = [RUNS[0], {**RUNS[2], "name": "mlp-b", "projector": "mlp2x_gelu"}]
    assert compare_runs(two).baseline is None  # the default is optional: ambiguous means none, said in the notes
    assert "several runs use mlp2x_gelu (mlp, mlp-b); name one as the baseline" in compare_runs(two).notes[0]
    with pytest.raises(ValueError, match="several runs use projector 'mlp2x_gelu' \\(mlp, mlp-b\\); name the baseline"):
        compare_runs(two, baseline="mlp2x_gelu")


def test_report_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("spatial_mllm.evaluation.commands",))
    files = {}
    for run in RUNS:
        files[run["name"]] = tmp_path / f"{run['name']}.scores.json"
        files[run["name"]].write_text(json.dumps({k: v for k, v in run.items() if k != "control"}))
    (tmp_path / "ceiling.json").write_text(json.dumps(ceiling().to_dict()))
    out = tmp_path / "report"
    argv = ["report", "--runs", *(str(files[n]) for n in ("mlp", "sp", "saep")), "--blind", str(files["blind"]),
            "--text-ceiling", str(tmp_path / "ceiling.json"), "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "best overall: sp (sp is significantly more accurate overall than every other projector" in printed
    assert "LLaVA-SP (sp): supported: +50.0 points" in printed
    summary = json.loads((out / "report.json").read_text())
    assert summary["blind_control"] == "blind" and summary["text_ceiling"]["model"] == "tiny-llama"

    # A run scored on a subset is refused, naming both files; the user's report stays as it was.
    before = hashlib.sha256((out / "report.md").read_bytes()).hexdigest()
    subset = json.loads(files["saep"].read_text())
    subset["per_question"] = subset["per_question"][1:]
    tally = accuracy_by_group((row["category"], row["correct"]) for row in subset["per_question"])
    subset |= {"overall": tally["overall"], "categories": tally["groups"], "counts": tally["counts"] | {
        "categories": tally["counts"]["groups"]}}  # fmt: skip
    (tmp_path / "subset.scores.json").write_text(json.dumps(subset))
    argv = ["report", "--runs", str(files["mlp"]), str(tmp_path / "subset.scores.json"), "--out", str(out), "--overwrite"]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'subset.scores.json'} was scored on 119 questions and {files['mlp']} on 120" in error
    assert "(or allow mixed questions, --mixed-questions" in error
    assert hashlib.sha256((out / "report.md").read_bytes()).hexdigest() == before
    assert cli.main([*argv, "--mixed-questions"]) == 0
    assert json.loads((out / "report.json").read_text())["best_overall"] is None
