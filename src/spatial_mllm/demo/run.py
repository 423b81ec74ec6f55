"""The demo's run: the whole LLaVA recipe, end to end, on the built-in spatial world, compared honestly.

The encoders are the shipped ones (`encoders/shipped`: a ViT whose patches say what lies under them, a Llama that
answers the world's questions from a written description), or pretrained in the run with `train_encoders`. Then,
for each projector and each training seed, on the same data: stage 1 (projector only, `plain` captions), stage 2
(LLM + projector, `vicuna_v1` conversations), evaluation on the test and compositional hold-out splits. Beside
them: the blind control (the baseline's recipe with every image replaced by another sample's, in training and in
evaluation: what is reachable without seeing) and the text ceiling (the LLM given the scene in words). The report
compares them question by question with intervals (evaluation.comparison).
The ViT is frozen throughout, so its features are computed once and shared by every projector. Everything
expensive is cached under the run folder: a second run reuses what has not changed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .parallel import default_jobs, map_in_processes, threads_per_job
from .plan import BLIND_PROJECTOR, DEFAULT, DEMO_PROJECTORS, DemoPlan

logger = logging.getLogger(__name__)
BLIND_ARM = "blind"


def log(message: str) -> None:
    logger.info(message)


@dataclass(frozen=True)
class EvalSet:
    """The questions of one split's first images, as files: what every arm is asked (the blind control with
    `blind_images` as its image folder: the same files, each image replaced by another of the split), and the
    split's scenes by image path (what binding measures replies against)."""

    split: str
    questions: Path
    answer_key: Path
    blind_images: Path
    scenes: dict[str, Any]


# --- inputs ----------------------------------------------------------------------------------------------------------


def make_world_once(out: Path, plan: DemoPlan, seed: int) -> Path:
    from ..cache import cached_folder, digest
    from .world import make_world
    from .world.make import WORLD_VERSION

    def build(folder: Path) -> None:
        log(f"world: generating seed {seed}, {plan.world}")
        make_world(folder, seed=seed, overwrite=True, progress=True, **plan.world)

    entry = cached_folder(out / "cache", "world", digest(WORLD_VERSION, seed, plan.world), build)
    if entry.reused:
        log(f"world: reusing {entry.path}")
    link = out / "world"  # a stable name for the world this run uses (images to try the models on)
    if link.is_symlink() or not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(entry.path.relative_to(out), target_is_directory=True)
    return entry.path


def split_images(world: Path, split: str) -> list[str]:
    """Image paths (relative to the world folder) of one split, in the world's order."""
    from .world.make import split_files

    with (world / split_files(split)["captions"]).open() as handle:
        return [json.loads(line)["image"] for line in handle]


def encoders(out: Path, plan: DemoPlan, train: bool) -> tuple[Path, Path, dict[str, Any]]:
    """(ViT folder, LLM folder with its tokenizer, their pretraining metrics): shipped, or pretrained here (cached)."""
    if not train:
        from .encoders.shipped import read_manifest, shipped_encoder

        manifest = read_manifest()
        log("encoders: the shipped ViT and LLM")
        metrics = {f"{name}_{key}": value for name in ("vit", "llm") for key, value in manifest[name]["metrics"].items()}
        return shipped_encoder("vit"), shipped_encoder("llm"), metrics
    from ..cache import code_version, digest
    from .encoders import dense_vit, description_llm
    from .pretraining import cached_pretraining

    cache = out / "cache"
    vit = cached_pretraining(cache, "vit", digest(dataclasses.asdict(plan.vit), code_version(dense_vit.__file__)),
                             lambda folder: dense_vit.pretrain_vit(folder, plan.vit, log=log))
    llm = cached_pretraining(
        cache, "llm", digest(dataclasses.asdict(plan.llm), code_version(description_llm.__file__)),
        lambda folder: description_llm.pretrain_description_llm(folder, plan.llm, log=log),
    )
    metrics = {f"vit_{k}": v for k, v in vit.metrics.items()} | {f"llm_{k}": v for k, v in llm.metrics.items()}
    return vit.path, llm.path, metrics


def feature_layers(vit: Path, projectors: tuple[str, ...], plan: DemoPlan) -> tuple[int, ...]:
    """The union of the ViT layers the projectors read (projectors built on the meta device: nothing allocated)."""
    from transformers import AutoConfig

    from ..projectors import build_projector
    from ..vision.tower import VisionTower, vision_config_of

    with torch.device("meta"):
        geometry = VisionTower.from_config(vision_config_of(AutoConfig.from_pretrained(vit))).geometry
        layers = {
            layer
            for name in projectors
            for layer in build_projector(name, geometry, 8, **plan.projector_options.get(name, {})).feature_layers
        }
    return tuple(sorted(layers))


def cache_features(out: Path, world: Path, vit: Path, layers: tuple[int, ...]):
    from ..model import ImageTransform, image_processor_for
    from ..training.feature_cache import cache_vision_features
    from ..vision import VisionTower

    tower = VisionTower.from_pretrained(str(vit))
    transform = ImageTransform(image_processor_for(str(vit)))  # what the models' processors will do
    paths = [path for split in ("train", "val", "test", "holdout") for path in split_images(world, split)]
    log(f"vision features: {len(paths)} images, ViT layers {layers}")
    return cache_vision_features(tower, paths, transform, layers, out / "cache" / "vision_features.safetensors",
                                 image_root=world, dtype="float32")


def derangement(items: list[Any], rng: random.Random) -> dict[Any, Any]:
    """item -> another item, a permutation without fixed points (a shuffled cycle), for replacing images."""
    if len(set(items)) < 2:
        raise ValueError("a blind control needs at least two distinct images")
    order = sorted(set(items))
    rng.shuffle(order)
    return {item: order[(index + 1) % len(order)] for index, item in enumerate(order)}


def instruct_mix(world: Path, out: Path, split: str = "train", blind: bool = False) -> Path:
    """Stage-2 data as LLaVA-665K mixes it: the conversations plus the detailed descriptions (as LLaVA's
    detail_23k), which carry most of what ties the image to the words. Blind: every record's image is replaced
    by another record's (the text is kept)."""
    from ..files import write_text

    records = []
    for name in (f"llava_stage2_{split}.json", f"llava_stage1_{split}.json"):
        records += json.loads((world / name).read_text())
    suffix = "" if split == "train" else f"_{split}"
    if blind:
        records = blind_records(records, f"blind-{split}")
        suffix += "_blind"
    return write_text(out / "data" / f"llava_stage2_mix{suffix}.json", json.dumps(records))


def blind_records(records: list[dict[str, Any]], seed: str) -> list[dict[str, Any]]:
    """The records with each image replaced by another record's image (deterministic)."""
    swap = derangement([record["image"] for record in records if "image" in record], random.Random(seed))
    return [dict(record, image=swap[record["image"]]) if "image" in record else record for record in records]


def blind_stage1(world: Path, out: Path) -> Path:
    from ..files import write_text

    records = json.loads((world / "llava_stage1_train.json").read_text())
    return write_text(out / "data" / "llava_stage1_blind.json", json.dumps(blind_records(records, "blind-stage1")))


def eval_set(world: Path, out: Path, split: str, plan: DemoPlan) -> EvalSet:
    """The questions of the split's first `plan.eval_images` images as files, and the blind control's image folder."""
    from ..diagnostics.probe import read_scenes
    from ..evaluation.records import read_jsonl
    from ..files import write_text
    from .world.make import split_files

    files = split_files(split)
    images = split_images(world, split)[: plan.eval_images]
    chosen = set(images)
    paths = {}
    for kind in ("questions", "answer_key"):
        rows = [row for row in read_jsonl(world / files[kind]) if row["image"] in chosen]
        paths[kind] = write_text(out / "data" / f"{split}_{kind}.jsonl",
                                 "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    blind = out / "data" / f"{split}_blind_images"
    swap = derangement(images, random.Random(f"blind-eval-{split}"))
    for image, replacement in swap.items():
        target = blind / image
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(world / replacement, target)
    scenes = {scene.image: scene for scene in read_scenes(world, split)}
    return EvalSet(split, paths["questions"], paths["answer_key"], blind, scenes)


def text_ceilings(llm: Path, world: Path, eval_sets: dict[str, EvalSet]) -> dict[str, dict[str, Any]]:
    """Per split: the LLM's scores on the same questions with the scene description in place of the image
    (TextCeiling), with and without it, and how its attribute replies bind to the object asked about; for an LLM
    pretrained on grid cells also its scores from the exact cells ("with_grid<side>")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..cache import file_digest
    from ..diagnostics.text_accuracy import text_only_results
    from ..evaluation.records import read_jsonl
    from ..evaluation.text_ceiling import TextCeiling
    from .encoders.description_llm import taught_grid_sides

    model = AutoModelForCausalLM.from_pretrained(str(llm)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(llm))
    name = f"{llm.parent.name}/{llm.name}"  # "shipped/llm", or the run's cache entry
    sides = taught_grid_sides(llm)
    grids = [f"with_grid{side}" for side in sides]
    ceilings = {}
    for split, questions in eval_sets.items():
        results = text_only_results(model, tokenizer, world, split, None,
                                    questions=list(read_jsonl(questions.questions)), grid_sides=sides)
        found = {kind: results[kind] for kind in ("with_description", "without_description", *grids)}
        ceiling = TextCeiling.from_scores(found["with_description"], name, file_digest(questions.questions))
        log(f"text ceiling ({split}): {found['with_description']['overall']:.1%} with the description, "
            f"{found['without_description']['overall']:.1%} without"
            + "".join(f", {found[grid]['overall']:.1%} from {grid.removeprefix('with_')} cells" for grid in grids))
        ceilings[split] = {"ceiling": ceiling, "scores": found, "binding": results["binding"]}
    return ceilings


# --- training and evaluation -----------------------------------------------------------------------------------------


def stage_config(stage: str, plan: DemoPlan, out_dir: Path, train_json: Path, world: Path, seed: int, **fields: Any):
    """The shipped world config of the stage with this demo's paths and schedule as `key=value` overrides."""
    from ..training.config import load_config

    stage_plan = plan.stage1 if stage == "align" else plan.stage2
    overrides = {
        "output_dir": out_dir,
        "resume": "auto",
        "data.train_json": train_json,
        "data.image_folder": world,
        "data.group_by_length": True,  # measured (benchmarks/training.py): 1.3x samples/s, padding 33% -> 8%
        "optimisation.max_steps": stage_plan.steps,
        "optimisation.global_batch_size": stage_plan.global_batch_size,
        "optimisation.micro_batch_size": stage_plan.micro_batch_size,
        "optimisation.lr": stage_plan.lr,
        "optimisation.projector_lr": stage_plan.projector_lr,
        "optimisation.seed": seed,
        "optimisation.mixed_precision": "bf16",
        "checkpoint.every_steps": max(1, stage_plan.steps // 2),
        **fields,
    }
    if stage == "instruct" and plan.lora_r is None:
        overrides["lora.enabled"] = False
    elif stage == "instruct":
        overrides |= {"lora.r": plan.lora_r, "lora.alpha": 2 * plan.lora_r}  # the paper's alpha = 2r
    return load_config(
        "world_stage1" if stage == "align" else "world_stage2",
        [f"{key}={json.dumps(value if not isinstance(value, Path) else str(value))}" for key, value in overrides.items()],
    )


def train_stage(config, features, progress: bool = True) -> Path:
    from ..data.dataset import LlavaDataset
    from ..model import RUN_INFO_FILE
    from ..training.config import load_config
    from ..training.engine import CONFIG_COPY, load_model, train
    from ..training.feature_dataset import CachedFeatureDataset

    final = Path(config.output_dir)
    saved = final / CONFIG_COPY
    if saved.is_file() and load_config(str(saved)).to_dict() != config.to_dict():
        log(f"{config.stage.name}: settings changed since {final} was trained; training it again")
        shutil.rmtree(final)
    elif (final / RUN_INFO_FILE).is_file():
        log(f"{config.stage.name}: reusing {final}")
        return final
    model, processor = load_model(config)
    layers = model.vision_feature_layers
    del model
    processor.use_template(config.data.template)
    base = LlavaDataset(config.data.train_json, config.data.image_folder, processor, config.data.max_length,
                        config.data.overlong, load_images=False)
    return train(config, CachedFeatureDataset(base, features, layers), progress=progress)


def evaluate(model, processor, model_dir: Path, world: Path, questions: EvalSet, name: str, out: Path,
             blind: bool) -> dict[str, Any]:
    """The eval set's questions answered (from each question's own image, or blind from another's) and scored."""
    from ..evaluation.evaluate import evaluate_questions

    evaluation = evaluate_questions(
        model, processor, questions.questions, questions.blind_images if blind else world,
        out / f"{questions.split}_answers.jsonl", answer_key=questions.answer_key, name=name, model_dir=model_dir,
        batch_size=32, max_new_tokens=4, overwrite=True, progress=False,  # the demo's own files, remade with its models
    )
    return evaluation.scores


def answer_binding(answers: Path, questions: EvalSet) -> dict[str, Any]:
    """`binding_outcomes` of an arm's answers file against the questions' own scenes (for the blind control too:
    what it names, measured against the scene it was asked about)."""
    from ..diagnostics.binding import binding_outcomes
    from ..evaluation.records import read_jsonl

    replies = {record["question_id"]: record["text"] for record in read_jsonl(answers)}
    return binding_outcomes(replies, read_jsonl(questions.answer_key), questions.scenes)


def measure_latency(model, processor, world: Path, plan: DemoPlan) -> dict[str, float]:
    """Prefill + 4 greedy tokens per sample, batch 1, from pixels (ViT included), median over samples."""
    from PIL import Image

    paths = split_images(world, "test")[: plan.latency_samples]
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhere is the red circle?"}],
                                           add_generation_prompt=True)
    times = []
    with torch.inference_mode():
        for path in paths:
            with Image.open(world / path) as image:
                inputs = processor(images=[image.convert("RGB")], text=prompt)
            started = time.perf_counter()
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=processor.tokenizer.pad_token_id)
            times.append(time.perf_counter() - started)
    times.sort()
    return {"latency_ms_per_sample": 1000 * times[len(times) // 2]}


def measure_image_reliance(model, processor, val_data: Path, world: Path, features) -> dict[str, Any]:
    """Held-out stage-2 loss with each sample's own image vs another's (see evaluation.image_reliance)."""
    from ..data.dataset import LlavaDataset
    from ..evaluation.image_reliance import image_reliance
    from ..training.engine import make_collator
    from ..training.feature_dataset import CachedFeatureDataset

    base = LlavaDataset(val_data, world, processor, load_images=False)
    dataset = CachedFeatureDataset(base, features, model.vision_feature_layers)
    return image_reliance(model, dataset, make_collator(processor)).to_dict()


@dataclass(frozen=True)
class Arm:
    """One recipe of the comparison: a projector, trained on its own images or blind."""

    name: str
    projector: str
    blind: bool = False


def run_arm(arm: Arm, seed: int, seeds: int, out: Path, world: Path, data: dict[str, Path], vit: Path, llm: Path,
            features, eval_sets: dict[str, EvalSet], plan: DemoPlan, progress: bool = True) -> dict[str, Any]:
    """Train one arm with one seed, evaluate it; returns the run dict (runs.py) with the test split's scores at top
    level and the hold-out split's under "holdout". progress: training's progress bars."""
    from ..model.loading import load_for_inference

    started = time.perf_counter()
    log(f"--- {arm.name}, seed {seed}: training (torch threads: {torch.get_num_threads()}) ---")
    name = arm.name if seeds == 1 else f"{arm.name}-seed{seed}"
    folder = out / "runs" / f"{arm.name}-seed{seed}"
    options = plan.projector_options.get(arm.projector, {})
    model_fields = {"model.vision": vit, "model.llm": llm, "model.tokenizer": llm, "model.projector": arm.projector,
                    "model.projector_options": options}
    stage1 = train_stage(stage_config("align", plan, folder / "stage1", data["stage1_blind" if arm.blind else "stage1"],
                                      world, seed, **model_fields), features, progress)
    stage2 = train_stage(stage_config("instruct", plan, folder / "stage2", data["train_blind" if arm.blind else "train"],
                                      world, seed, **{"stage.init_from": stage1, "model.projector": None}), features,
                         progress)
    model, processor = load_for_inference(stage2)  # loaded once for the facts, evaluation and latency
    facts: dict[str, Any] = {
        "arm": arm.name,
        "seed": seed,
        "control": "blind" if arm.blind else None,
        "final_loss_stage1": last_loss(stage1),
        "final_loss_stage2": last_loss(stage2),
        "image_reliance": measure_image_reliance(model, processor, data["val"], world, features),
    }
    scores = {split: evaluate(model, processor, stage2, world, eval_sets[split], name, folder / "eval", arm.blind)
              for split in eval_sets}
    binding = {split: answer_binding(folder / "eval" / f"{split}_answers.jsonl", eval_sets[split])
               for split in eval_sets}
    facts.update(measure_latency(model, processor, world, plan))
    facts["seconds"] = time.perf_counter() - started  # training (or reuse) and evaluation of this arm and seed
    facts["torch_threads"] = torch.get_num_threads()
    test = scores["test"] | facts | {"binding": binding["test"]}
    test["holdout"] = scores["holdout"] | facts | {"binding": binding["holdout"]}
    log(f"{name}: test {test['overall']:.1%}, hold-out {test['holdout']['overall']:.1%}")
    return test


def append_binding_section(report: Path, runs: list[dict[str, Any]], ceiling_binding: dict[str, Any],
                           ceiling_name: str) -> None:
    """Add the binding table (each arm averaged over its seeds, then the text ceiling) to a written report."""
    from ..diagnostics.binding import binding_markdown, mean_outcomes
    from ..files import write_text

    arms: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        arms.setdefault(run["arm"], []).append(run["binding"])
    rows = {arm: mean_outcomes(results) for arm, results in arms.items()}
    rows[f"text ceiling ({ceiling_name})"] = ceiling_binding
    write_text(report, report.read_text() + "\n" + binding_markdown(rows))


def without_outcomes(run: dict[str, Any]) -> dict[str, Any]:
    """A run dict without its per-question rows (they stay in the scores files beside the answers)."""
    return {key: value for key, value in run.items() if key != "per_question"}


def last_loss(stage_dir: Path) -> float:
    from ..training.metrics import METRICS_FILE

    return json.loads((stage_dir / METRICS_FILE).read_text().splitlines()[-1])["loss"]


def run_demo(out: Path, plan: DemoPlan = DEFAULT, seed: int = 0, projectors: tuple[str, ...] = DEMO_PROJECTORS,
             seeds: int = 1, train_encoders: bool = False, blind: bool = True, jobs: int | None = None) -> Path:
    """Run the comparison (training seeds seed..seed+seeds-1 on the world of `seed`) and write the reports:
    out/report (test split) and out/report/holdout (compositional hold-out). Returns out/report.

    jobs: arms trained at once, each in its own process with its share of the torch threads (parallel.py);
    default: one per CPU core (1 with a GPU). 1 trains them here, one after another, with progress bars."""
    from transformers.utils import logging as transformers_logging

    from ..evaluation.comparison import compare_runs
    from ..evaluation.report import write_report
    from ..files import write_json

    transformers_logging.disable_progress_bar()  # one bar per weight load would bury the demo's own progress
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(seed)
    world = make_world_once(out, plan, seed)
    vit, llm, pretrain_metrics = encoders(out, plan, train_encoders)
    data = {"stage1": world / "llava_stage1_train.json", "train": instruct_mix(world, out, "train"),
            "val": instruct_mix(world, out, "val")}
    if blind:
        data |= {"stage1_blind": blind_stage1(world, out), "train_blind": instruct_mix(world, out, "train", blind=True)}
    eval_sets = {split: eval_set(world, out, split, plan) for split in ("test", "holdout")}
    ceilings = text_ceilings(llm, world, eval_sets)
    features = cache_features(out, world, vit, feature_layers(vit, projectors, plan))
    arms = [Arm(name, name) for name in projectors] + ([Arm(BLIND_ARM, BLIND_PROJECTOR, blind=True)] if blind else [])
    calls = [(arm, training_seed, seeds, out, world, data, vit, llm, features, eval_sets, plan)
             for training_seed in range(seed, seed + seeds) for arm in arms]
    jobs = default_jobs(len(calls)) if jobs is None else jobs
    if jobs == 1:
        runs = [run_arm(*call) for call in calls]
    else:
        log(f"training {len(calls)} arms, {jobs} at a time (one process each, {threads_per_job(jobs)} torch threads)")
        runs = map_in_processes(run_arm, [(*call, False) for call in calls], jobs)
    report = out / "report"
    write_report(compare_runs(runs, text_ceiling=ceilings["test"]["ceiling"]), report, overwrite=True)
    write_report(compare_runs([run["holdout"] for run in runs], text_ceiling=ceilings["holdout"]["ceiling"]),
                 report / "holdout", overwrite=True)  # a rerun replaces its own reports
    for folder, split_runs, ceiling in ((report, runs, ceilings["test"]),
                                        (report / "holdout", [run["holdout"] for run in runs], ceilings["holdout"])):
        append_binding_section(folder / "report.md", split_runs, ceiling["binding"], ceiling["ceiling"].model)
    summary = {
        "plan": dataclasses.asdict(plan),
        "seed": seed,
        "seeds": seeds,
        "encoders": {"vit": str(vit), "llm": str(llm), "trained_in_run": train_encoders},
        "seconds": time.perf_counter() - started,
        "jobs": jobs,
        "pretraining": pretrain_metrics,
        "text_only": {split: {name: {key: scores[key] for key in ("overall", "categories", "counts")}
                              for name, scores in found["scores"].items()} for split, found in ceilings.items()},
        "text_only_binding": {split: found["binding"] for split, found in ceilings.items()},
        "runs": [without_outcomes(run) | {"holdout": without_outcomes(run["holdout"])} for run in runs],
    }
    write_json(report / "demo.json", summary)
    log(f"done in {summary['seconds']:.0f} s; report in {report}")
    return report


__all__ = ["run_demo"]
