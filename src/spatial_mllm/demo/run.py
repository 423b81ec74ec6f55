"""The demo's run: the whole LLaVA recipe, end to end, on the built-in spatial world.

No pretrained weights can be had offline, so the demo makes everything itself: the world, a tokenizer, a tiny
CLIP (contrastive, on object-list captions) and a tiny Llama (on the world's text). Then, for each projector, on
the same data and seeds: stage 1 (projector only, `plain` captions), stage 2 (LoRA + projector, `vicuna_v1`
conversations), evaluation on the test and compositional hold-out splits, and a comparison report.
The ViT is frozen throughout, so its features are computed once and shared by every projector.
Everything expensive is cached under the run folder: a second run reuses what has not changed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .plan import DEFAULT, DEMO_PROJECTORS, DemoPlan

logger = logging.getLogger(__name__)


def log(message: str) -> None:
    logger.info(message)


# --- steps -----------------------------------------------------------------------------------------------------------


def make_world_once(out: Path, plan: DemoPlan, seed: int) -> Path:
    from .world import make_world
    from .world.make import MANIFEST

    world = out / "world"
    wanted = {"seed": seed, **plan.world}
    manifest = world / MANIFEST
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        counts = have.get("counts", {})
        same = have.get("seed") == seed and all(
            counts.get(key[2:]) == value for key, value in plan.world.items()
        )
        if same:
            log(f"world: reusing {world}")
            return world
    log(f"world: generating {wanted}")
    make_world(world, seed=seed, overwrite=True, progress=True, **plan.world)
    return world


def tokenizer_once(out: Path, world: Path):
    from transformers import AutoTokenizer

    from .tokenizer import train_world_tokenizer, world_texts

    folder = out / "cache" / "tokenizer"
    stamp = folder / "world.json"
    if not (stamp.is_file() and stamp.read_bytes() == (world / "world.json").read_bytes()):
        log("tokenizer: training a byte-level BPE on the world's text")
        if folder.exists():
            shutil.rmtree(folder)
        train_world_tokenizer(world_texts(world), folder)
        shutil.copyfile(world / "world.json", stamp)
    return AutoTokenizer.from_pretrained(folder)


def split_images(world: Path, split: str) -> tuple[list[str], list[str]]:
    """(image paths relative to the world folder, object-list captions) of one split."""
    from .world.make import split_files

    paths, captions = [], []
    with (world / split_files(split)["captions"]).open() as handle:
        for line in handle:
            record = json.loads(line)
            paths.append(record["image"])
            captions.append(record["caption"])
    return paths, captions


def pretrain_encoders(out: Path, world: Path, tokenizer, plan: DemoPlan) -> tuple[Path, Path, dict[str, float]]:
    from .pretrain_llm import conversation_texts, pretrain_llm_cached
    from .pretrain_vision import pretrain_clip_cached

    cache = out / "cache"
    paths, captions = split_images(world, "train")
    clip = pretrain_clip_cached(cache, [world / p for p in paths], captions, tokenizer, plan.clip, log=log)
    texts = []
    for name in ("llava_stage1_train.json", "llava_stage2_train.json"):
        texts += conversation_texts(world / name, tokenizer, world, "vicuna_v1")
    llm = pretrain_llm_cached(cache, texts, tokenizer, plan.llm, log=log)
    metrics = {f"clip_{k}": v for k, v in clip.metrics.items()} | {f"llm_{k}": v for k, v in llm.metrics.items()}
    return clip.path, llm.path, metrics


def feature_layers(clip: Path, projectors: tuple[str, ...], plan: DemoPlan) -> tuple[int, ...]:
    """The union of the ViT layers the projectors read (projectors built on the meta device: nothing allocated)."""
    from transformers import AutoConfig

    from ..projectors import build_projector
    from ..vision.tower import VisionTower, vision_config_of

    with torch.device("meta"):
        geometry = VisionTower.from_config(vision_config_of(AutoConfig.from_pretrained(clip))).geometry
        layers = {
            layer
            for name in projectors
            for layer in build_projector(name, geometry, 8, **plan.projector_options.get(name, {})).feature_layers
        }
    return tuple(sorted(layers))


def cache_features(out: Path, world: Path, clip: Path, layers: tuple[int, ...]):
    from ..model import ImageTransform, image_processor_for
    from ..training.feature_cache import cache_vision_features
    from ..vision import VisionTower

    tower = VisionTower.from_pretrained(str(clip))
    transform = ImageTransform(image_processor_for(str(clip)))  # what the models' processors will do

    paths = []
    for split in ("train", "val", "test", "holdout"):
        paths += split_images(world, split)[0]
    log(f"vision features: {len(paths)} images, ViT layers {layers}")
    return cache_vision_features(tower, paths, transform, layers, out / "cache" / "vision_features.safetensors",
                                 image_root=world, dtype="float32")


def instruct_mix(world: Path, out: Path, split: str = "train") -> Path:
    """Stage-2 data as LLaVA-665K mixes it: the conversations plus the detailed descriptions (as LLaVA's
    detail_23k), which carry most of what ties the image to the words."""
    records = []
    for name in (f"llava_stage2_{split}.json", f"llava_stage1_{split}.json"):
        records += json.loads((world / name).read_text())
    from ..files import write_text

    mix = out / "data" / ("llava_stage2_mix.json" if split == "train" else f"llava_stage2_mix_{split}.json")
    return write_text(mix, json.dumps(records))


def stage_config(stage: str, plan: DemoPlan, out_dir: Path, train_json: Path, world: Path, seed: int, **fields: Any):
    """The shipped world config of the stage with this demo's paths and schedule as `key=value` overrides."""
    from ..training.config import load_config

    stage_plan = plan.stage1 if stage == "align" else plan.stage2
    overrides = {
        "output_dir": out_dir,
        "resume": "auto",
        "data.train_json": train_json,
        "data.image_folder": world,
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


def train_stage(config, features) -> Path:
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
    return train(config, CachedFeatureDataset(base, features, layers))


def evaluate(model, processor, model_dir: Path, world: Path, split: str, plan: DemoPlan, name: str,
             out: Path) -> dict[str, Any]:
    """The questions of the split's first `plan.eval_images` images, answered and scored; returns the scores."""
    from .world.make import split_files
    from ..evaluation.evaluate import evaluate_questions
    from ..evaluation.records import read_jsonl

    files = split_files(split)
    images = set(split_images(world, split)[0][: plan.eval_images])
    out.mkdir(parents=True, exist_ok=True)
    subsets = {}
    for kind in ("questions", "answer_key"):
        subsets[kind] = out / f"{split}_{kind}.jsonl"
        rows = [r for r in read_jsonl(world / files[kind]) if r["image"] in images]
        subsets[kind].write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    evaluation = evaluate_questions(
        model, processor, subsets["questions"], world, out / f"{split}_answers.jsonl",
        answer_key=subsets["answer_key"], name=name, model_dir=model_dir, batch_size=32, max_new_tokens=4,
        overwrite=True, progress=False,  # the demo's own files, remade when its models change
    )
    return evaluation.scores


def measure_latency(model, processor, world: Path, plan: DemoPlan) -> dict[str, float]:
    """Prefill + 4 greedy tokens per sample, batch 1, from pixels (ViT included), median over samples."""
    from PIL import Image

    paths = split_images(world, "test")[0][: plan.latency_samples]
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


def run_projector(name: str, out: Path, world: Path, data: dict[str, Path], clip: Path, llm: Path,
                  tokenizer_dir: Path, features, plan: DemoPlan, seed: int) -> dict[str, Any]:
    from ..model.loading import load_for_inference

    folder = out / name
    options = plan.projector_options.get(name, {})
    model_fields = {"model.vision": clip, "model.llm": llm, "model.tokenizer": tokenizer_dir, "model.projector": name,
                    "model.projector_options": options}
    stage1 = train_stage(stage_config("align", plan, folder / "stage1", world / "llava_stage1_train.json", world, seed,
                                      **model_fields), features)
    stage2 = train_stage(stage_config("instruct", plan, folder / "stage2", data["train"], world, seed,
                                      **{"stage.init_from": stage1, "model.projector": None}), features)
    # Loaded once for the facts, image reliance, evaluation and latency.
    model, processor = load_for_inference(stage2)
    result: dict[str, Any] = {
        "name": name,
        "projector": name,
        "visual_tokens": model.num_image_tokens,
        "projector_parameters": sum(p.numel() for p in model.projector.parameters()),
        "final_loss_stage1": last_loss(stage1),
        "final_loss_stage2": last_loss(stage2),
        "image_reliance": measure_image_reliance(model, processor, data["val"], world, features),
    }
    for split in ("test", "holdout"):
        scores = evaluate(model, processor, stage2, world, split, plan, name, folder / "eval")
        result[split] = {key: scores[key] for key in ("overall", "categories", "counts", "answered", "tokens_per_second")}
    result.update(result["test"])  # the report's main columns are the test split's
    result.update(measure_latency(model, processor, world, plan))
    return result


def last_loss(stage_dir: Path) -> float:
    from ..training.metrics import METRICS_FILE

    return json.loads((stage_dir / METRICS_FILE).read_text().splitlines()[-1])["loss"]


def run_demo(out: Path, plan: DemoPlan = DEFAULT, seed: int = 0, projectors: tuple[str, ...] = DEMO_PROJECTORS) -> Path:
    from transformers.utils import logging as transformers_logging

    from ..evaluation.report import write_report

    transformers_logging.disable_progress_bar()  # one bar per weight load would bury the demo's own progress
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(seed)
    world = make_world_once(out, plan, seed)
    instruct_data = {split: instruct_mix(world, out, split) for split in ("train", "val")}
    tokenizer = tokenizer_once(out, world)
    tokenizer_dir = out / "cache" / "tokenizer"
    clip, llm, pretrain_metrics = pretrain_encoders(out, world, tokenizer, plan)
    features = cache_features(out, world, clip, feature_layers(clip, projectors, plan))
    results = []
    for name in projectors:
        log(f"--- {name} ---")
        results.append(run_projector(name, out, world, instruct_data, clip, llm, tokenizer_dir, features, plan, seed))
    paths = write_report(results, out / "report", overwrite=True)  # a rerun replaces its own report
    summary = {
        "plan": dataclasses.asdict(plan),
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "pretraining": pretrain_metrics,
        "runs": results,
    }
    (out / "report" / "demo.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    log(f"done in {summary['seconds']:.0f} s; report in {out / 'report'}")
    return out / "report"


__all__ = ["run_demo"]
