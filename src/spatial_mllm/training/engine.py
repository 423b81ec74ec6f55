"""The LLaVA two-stage training engine on accelerate.

One process (CPU or GPU) or several: DDP through `accelerate launch` / `torchrun`, FSDP or DeepSpeed ZeRO through
`accelerate launch --config_file` (see the shipped `launch_*.yaml`). bf16 autocast, gradient accumulation and
checkpointing, warmup + cosine schedule, atomic resumable checkpoints, metrics (JSONL, TensorBoard, loss PNG).

`train(config)` returns the output folder, which `SpatialMLLMForConditionalGeneration.from_pretrained` loads
(with the processor saved beside the model). A LoRA run's folder also holds the adapter (see lora.py).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..model import RUN_INFO_FILE, SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor, build_model
from ..files import move_into, new_staging_folder
from ..model.loading import adapter_is_its_own, load_model_folder, run_info
from .batches import MicroBatchSampler, VisionFeatureCollator, move_batch
from .checkpoint import (
    CHECKPOINTS,
    CorruptCheckpointError,
    write_json,
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    is_complete,
    load_checkpoint,
    remove_stale_staging,
    restore_rng,
    save_checkpoint,
)
from .config import TrainConfig, save_config
from .lora import inject_lora, save_adapter, split_lora_state_dict
from .metrics import LOSS_PLOT, METRICS_FILE, TENSORBOARD_DIR, MetricsLogger
from .params import component_of, configure_trainable, parameter_groups, upcast_trainable

logger = logging.getLogger(__name__)

CONFIG_COPY = "train_config.yaml"
# Settings a resumed run may change: they do not alter what is computed, only how (or where it is written).
RESUME_FREE_KEYS = {
    "data.num_workers", "data.strict", "optimisation.micro_batch_size", "optimisation.gradient_checkpointing",
    "optimisation.mixed_precision", "checkpoint.every_steps", "checkpoint.keep_last", "output_dir", "resume",
    "overwrite",
}


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss or the gradient norm is NaN or infinite."""


# --- setting up ------------------------------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    """An accelerate launch setting passed through the environment (`accelerate launch` sets them)."""
    return os.environ.get(name, "false").lower() in ("1", "true")


def make_accelerator(config: TrainConfig) -> Accelerator:
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            "the launch config asks for DeepSpeed but the deepspeed package is not installed: `pip install deepspeed` "
            "(needs CUDA), or launch with launch_ddp.yaml / launch_fsdp.yaml instead"
        )
    if _env_flag("ACCELERATE_USE_FSDP") and config.model.dtype != "float32":
        # Measured (torch FSDP 1 and 2): "Must flatten tensors with uniform dtype" / "FSDP expects uniform original
        # parameter dtype", since trainable weights are always float32 (upcast_trainable).
        raise ValueError(
            f"the launch config asks for FSDP, which needs one dtype for all the weights it shards, but model.dtype is "
            f"{config.model.dtype!r} (trainable weights are float32): set model.dtype=float32; the launch config's bf16 "
            "mixed precision still computes in bf16"
        )
    if _env_flag("ACCELERATE_USE_FSDP") and not torch.accelerator.is_available():
        raise ValueError(
            "the launch config asks for FSDP, which accelerate runs on GPUs (or other accelerators) only and this "
            "machine has none; on CPU launch several processes with launch_ddp.yaml instead"
        )
    # accelerate keeps its settings in process-wide singletons that cannot change once made, and one process may
    # run several stages (the demo, the tests), so the stage's own settings stay out of them: bf16 autocast is
    # applied around each forward pass here (`autocast`), gradient accumulation is set on the accelerator below.
    accelerator = Accelerator(
        # Without a GPU (or other accelerator), processes started by torchrun must still form a (gloo) group.
        cpu=not torch.accelerator.is_available(),
        # A micro-batch without images leaves the projector out of the graph; DDP must not wait for its gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    launch_precision = accelerator.mixed_precision
    if launch_precision not in ("no", config.optimisation.mixed_precision):
        raise ValueError(
            f"the launch config asks for mixed precision {launch_precision!r} but optimisation.mixed_precision is "
            f"{config.optimisation.mixed_precision!r}; make them agree"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ValueError(f"{launched} processes were launched but accelerate set up {accelerator.num_processes}")
    accelerator.gradient_accumulation_steps = config.optimisation.grad_accum_steps(accelerator.num_processes)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # We feed our own batches (no prepared DataLoader), so DeepSpeed is told the batch geometry directly.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = config.optimisation.micro_batch_size
        ds_config["gradient_accumulation_steps"] = accelerator.gradient_accumulation_steps
    return accelerator


def load_model(config: TrainConfig) -> tuple[SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor]:
    """The model to train, with model.attn_implementation set: the `stage.init_from` folder (e.g. a stage-1 output)
    or one built from model.*."""
    model, processor = _load_model(config)
    if config.model.attn_implementation is not None:
        use_attention(model, config.model.attn_implementation)
    return model, processor


def use_attention(model: SpatialMLLMForConditionalGeneration, implementation: str) -> None:
    """In place: the LLM and the vision tower attend through transformers' `implementation` kernel."""
    model.language_model.set_attn_implementation(implementation)  # its config is the model's text_config
    model.vision_tower.model.set_attn_implementation(implementation)


def _load_model(config: TrainConfig) -> tuple[SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor]:
    dtype = getattr(torch, config.model.dtype)
    if config.stage.init_from is None:
        m = config.model
        return build_model(m.vision, m.llm, m.tokenizer or m.llm, m.projector, m.projector_options, dtype=dtype)
    folder = Path(config.stage.init_from)
    model, processor = load_model_folder(folder, dtype, what="stage.init_from", adapter=False)
    if adapter_is_its_own(folder, run_info(folder)):
        raise ValueError(
            f"stage.init_from {folder} holds a LoRA adapter; fold it in first: spatial-mllm merge --model {folder} --out DIR"
        )
    wanted = config.model.projector
    if wanted is not None and wanted != model.config.projector_type:
        raise ValueError(f"stage.init_from {folder} holds a {model.config.projector_type!r} model but model.projector is {wanted!r}")
    options = config.model.projector_options
    if options and options != model.config.projector_options:
        raise ValueError(
            f"stage.init_from {folder} was built with projector_options {model.config.projector_options}, "
            f"model.projector_options says {options}"
        )
    return model, processor


def check_data_files(config: TrainConfig) -> None:
    data = config.data
    if not data.train_json:
        raise ValueError("data.train_json is required: the LLaVA JSON file to train on (or pass a dataset to train())")
    if not Path(data.train_json).is_file():
        raise FileNotFoundError(f"data.train_json {data.train_json}: no such file")
    if data.image_folder and not Path(data.image_folder).is_dir():
        raise FileNotFoundError(f"data.image_folder {data.image_folder}: no such folder")


def build_dataset(config: TrainConfig, processor: SpatialMLLMProcessor, load_images: bool = True) -> Dataset:
    """The run's LLaVA JSON through its processor (whose template `prepare_model` set); `load_images=False` when
    images come as cached ViT features instead."""
    from ..data.dataset import LlavaDataset

    return LlavaDataset(
        config.data.train_json,
        config.data.image_folder,
        processor,
        max_length=config.data.max_length,
        overlong=config.data.overlong,
        strict=config.data.strict,
        load_images=load_images,
    )


def make_collator(processor: SpatialMLLMProcessor, pad_to_multiple_of: int | None = None) -> VisionFeatureCollator:
    from ..data.collator import DataCollator

    return VisionFeatureCollator(DataCollator(processor.tokenizer.pad_token_id, padding_side="right",
                                              pad_to_multiple_of=pad_to_multiple_of))


def resume_fingerprint(config: TrainConfig, num_samples: int) -> dict[str, Any]:
    flat = flatten(config.to_dict())
    fingerprint = {k: v for k, v in flat.items() if k not in RESUME_FREE_KEYS}
    fingerprint["dataset.num_samples"] = num_samples
    return fingerprint


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "projector_options":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def checkpoints_to_resume(config: TrainConfig) -> list[Path]:
    """The checkpoints to try, best first: with resume=auto every complete one of output_dir, newest first (a
    damaged newest one falls back to the next); with a folder, that one; none for a fresh run."""
    output_dir = Path(config.output_dir)
    if config.resume is None:
        return []
    if config.resume == "auto":
        return list_checkpoints(output_dir)[::-1]
    folder = Path(config.resume)
    if not is_complete(folder):
        raise FileNotFoundError(f"resume: {folder} is not a complete checkpoint folder (no trainer_state.json)")
    return [folder]


RUN_ARTEFACTS = {CONFIG_COPY, METRICS_FILE, LOSS_PLOT, TENSORBOARD_DIR, CHECKPOINTS, RUN_INFO_FILE}


def is_run_folder(folder: Path) -> bool:
    """Whether a folder holds a training run of this toolkit (finished, or killed part-way)."""
    return any((folder / name).exists() for name in (CONFIG_COPY, CHECKPOINTS, RUN_INFO_FILE))


def check_output_dir(config: TrainConfig) -> None:
    """output_dir must be new, empty, or a run of ours: continued with resume, replaced with overwrite=true (its
    own files only); a folder holding anything else is refused, naming what is there."""
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir} is a file, not a folder")
    if not output_dir.is_dir():
        return
    present = sorted(path.name for path in output_dir.iterdir() if not path.name.startswith(".tmp-"))
    if not present:
        return
    if not is_run_folder(output_dir):
        raise ValueError(
            f"output_dir {output_dir} holds files that are not a spatial-mllm run of this toolkit "
            f"({', '.join(present[:6])}); choose a new or empty folder"
        )
    if config.resume is None and not config.overwrite:
        what = "checkpoints of a run" if list_checkpoints(output_dir) else "a run"
        raise ValueError(
            f"output_dir {output_dir} already holds {what}: set resume=auto to continue it, overwrite=true to "
            "replace it, or choose another output_dir"
        )


def clear_output_dir(output_dir: Path) -> None:
    """Removes the earlier run's own files from output_dir: its artefacts and the files its run info lists
    (anything else there is left as it is; the new export replaces files of the same names)."""
    for name in sorted(RUN_ARTEFACTS | set(run_info(output_dir).get("files", []))):
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def describe_trainable(model: torch.nn.Module) -> str:
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        entry = counts.setdefault(component_of(name), [0, 0])
        entry[0] += param.numel() * param.requires_grad
        entry[1] += param.numel()
    return ", ".join(f"{c} {t:,}/{n:,}" for c, (t, n) in sorted(counts.items()))


# --- the run ---------------------------------------------------------------------------------------------------------


def prepare_model(config: TrainConfig):
    """The model loaded and readied for its stage (see configure_for_stage); returns (model, processor, LoraConfig
    or None)."""
    model, processor = load_model(config)
    if config.data.template is not None:
        processor.use_template(config.data.template)  # saved with the model: it is how the model will be prompted
    return model, processor, configure_for_stage(model, config)


def configure_for_stage(model: SpatialMLLMForConditionalGeneration, config: TrainConfig):
    """In place: LoRA injected (instruct + lora.enabled), the stage's parameters trainable (in float32) and
    gradient checkpointing as configured. Returns the LoraConfig, or None without LoRA."""
    lora_config = inject_lora(model, config.lora) if config.stage.name == "instruct" and config.lora.enabled else None
    configure_trainable(model, config)
    upcast_trainable(model)
    if config.optimisation.gradient_checkpointing:
        model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return lora_config


def make_optimizer(model: torch.nn.Module, config: TrainConfig, total_steps: int):
    opt = config.optimisation
    optimizer = torch.optim.AdamW(parameter_groups(model, config))
    warmup = math.ceil(opt.warmup_ratio * total_steps)
    return optimizer, get_scheduler(opt.schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def train(config: TrainConfig, dataset: Dataset | None = None, progress: bool = True) -> Path:
    """Runs one stage as configured and returns the output folder (loadable by from_pretrained).

    progress: a progress bar of the steps on the main process (off when several trainings share a terminal).

    dataset: items as LlavaDataset yields them (input_ids, labels, pixel_values or None, id), optionally with
    `vision_features` (cached ViT hidden states, see batches.VisionFeatureCollator) in place of pixel_values;
    default: LlavaDataset over data.train_json.
    """
    config.validate()
    opt = config.optimisation
    output_dir = Path(config.output_dir)
    if dataset is None:  # checked before minutes go into loading the models
        check_data_files(config)
    check_output_dir(config)  # every process (read-only); the main one clears a run replaced with overwrite=true
    accelerator = make_accelerator(config)
    if accelerator.is_main_process and config.overwrite and config.resume is None:
        clear_output_dir(output_dir)
    accelerator.wait_for_everyone()
    candidates = checkpoints_to_resume(config)

    set_seed(opt.seed)
    model, processor, lora_config = prepare_model(config)
    if dataset is None:
        dataset = build_dataset(config, processor)
    lengths = None
    if config.data.group_by_length:
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            raise ValueError("data.group_by_length needs a dataset that knows its samples' lengths (LlavaDataset does)")
    sampler_args = dict(
        num_samples=len(dataset), global_batch_size=opt.global_batch_size, micro_batch_size=opt.micro_batch_size,
        world_size=accelerator.num_processes, rank=accelerator.process_index, seed=opt.seed, lengths=lengths,
    )
    steps_per_epoch = MicroBatchSampler(**sampler_args).steps_per_epoch
    total_steps = opt.max_steps or opt.epochs * steps_per_epoch
    optimizer, scheduler = make_optimizer(model, config, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    fingerprint = resume_fingerprint(config, len(dataset))
    state = TrainerState(0, 0, 0, 0, total_steps, accelerator.num_processes, fingerprint)
    rng, resume_from = None, None
    for candidate in candidates:
        try:
            state, rng = load_checkpoint(candidate, accelerator, model, optimizer, scheduler, fingerprint)
        except CorruptCheckpointError as err:
            logger.warning("skipping checkpoint %s: %s", candidate, err)
            accelerator.print(f"[{config.stage.name}] skipping checkpoint {candidate}: {err}")
            continue
        resume_from = candidate
        if rng is None:
            logger.warning("%s has no RNG state for process %d: dropout will not repeat exactly", resume_from, accelerator.process_index)
        break
    if candidates and resume_from is None:
        if config.resume != "auto":
            raise ValueError(f"resume: {candidates[0]} cannot be read; see the message above")
        accelerator.print(f"[{config.stage.name}] no checkpoint in {output_dir} can be read: starting from step 0")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(output_dir)
        save_config(config, output_dir / CONFIG_COPY)
    accelerator.wait_for_everyone()
    accelerator.print(
        f"[{config.stage.name}] {len(dataset)} samples, {steps_per_epoch} steps/epoch, {total_steps} steps, "
        f"global batch {opt.global_batch_size} = {opt.micro_batch_size} x {accelerator.num_processes} process(es) "
        f"x {accelerator.gradient_accumulation_steps} accumulation; "
        f"trainable: {describe_trainable(accelerator.unwrap_model(model))}"
        + (f"; resuming from {resume_from} (step {state.step})" if resume_from else "")
    )

    sampler = MicroBatchSampler(**sampler_args, start_epoch=state.epoch, start_step_in_epoch=state.step_in_epoch)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=make_collator(processor, config.data.pad_to_multiple_of),
        num_workers=config.data.num_workers,
        # Its own generator: creating the iterator must not draw from the global RNG (resume would drift).
        generator=torch.Generator().manual_seed(opt.seed),
    )
    batches = iter(loader)
    if rng is not None:
        restore_rng(rng)

    model.train()
    accelerator.unwrap_model(model).vision_tower.train(config.vision.trainable)
    metrics = MetricsLogger(output_dir, state.step, enabled=accelerator.is_main_process)
    progress = tqdm(total=total_steps, initial=state.step, desc=config.stage.name,
                    disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    last_checkpoint = resume_from
    try:
        while state.step < total_steps:
            started = time.perf_counter()
            loss, grad_norm = accumulate_gradients(accelerator, model, batches, config)
            check_finite(loss, grad_norm, state.step + 1, last_checkpoint)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.samples_seen += opt.global_batch_size
            state.epoch, state.step_in_epoch = divmod(state.step, steps_per_epoch)
            values = {
                "loss": loss,
                **learning_rates(optimizer),
                "grad_norm": grad_norm,
                "samples_per_s": opt.global_batch_size / (time.perf_counter() - started),
                "epoch": state.step / steps_per_epoch,
            }
            metrics.log(state.step, values)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}", samples_s=f"{values['samples_per_s']:.1f}")
            if state.step % config.checkpoint.every_steps == 0 or state.step == total_steps:
                last_checkpoint = save_checkpoint(
                    accelerator, model, optimizer, scheduler, state, output_dir, config.checkpoint.keep_last
                )
    finally:
        progress.close()
        metrics.close()

    export_model(accelerator, model, processor, lora_config, config)
    accelerator.wait_for_everyone()
    return output_dir


def accumulate_gradients(accelerator: Accelerator, model: torch.nn.Module, batches, config: TrainConfig):
    """Forward and backward over this process's micro-batches of one global batch, then gradient clipping.
    Returns (mean loss over all micro-batches of all processes, gradient norm before clipping or None)."""
    loss_sum = torch.zeros((), device=accelerator.device)
    for _ in range(accelerator.gradient_accumulation_steps):
        batch = to_device(next(batches), accelerator.device, config)
        with accelerator.accumulate(model):  # gradients are synchronised on the last micro-batch only
            with autocast(accelerator.device, config):
                loss = model(**batch, use_cache=False).loss
            accelerator.backward(loss)
        loss_sum += loss.detach().float()
    loss = accelerator.reduce(loss_sum / accelerator.gradient_accumulation_steps, reduction="mean").item()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = accelerator.clip_grad_norm_(trainable, config.optimisation.max_grad_norm or float("inf"))
    return loss, None if grad_norm is None else float(grad_norm)


def autocast(device: torch.device, config: TrainConfig):
    """bf16 autocast of a forward pass when the config asks for it (on CPU as on GPU)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.optimisation.mixed_precision == "bf16")


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`lr`: the first group's (the LLM's in stage 2, the projector's in stage 1); `lr_projector` when it differs."""
    groups = {group["name"]: group["lr"] for group in optimizer.param_groups}
    rates = {"lr": optimizer.param_groups[0]["lr"]}
    if "projector" in groups and optimizer.param_groups[0]["name"] != "projector":
        rates["lr_projector"] = groups["projector"]
    return rates


def to_device(batch: dict[str, Any], device: torch.device, config: TrainConfig) -> dict[str, Any]:
    moved = move_batch(batch, device)
    if moved.get("vision_features") is not None and config.vision.trainable:
        raise ValueError("the data gives cached vision_features, which bypass the vision tower; vision.trainable must be false")
    return moved


def check_finite(loss: float, grad_norm: float | None, step: int, last_checkpoint: Path | None) -> None:
    bad = []
    if not math.isfinite(loss):
        bad.append(f"loss {loss}")
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append(f"gradient norm {grad_norm}")
    if bad:
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"training diverged at step {step}: {' and '.join(bad)} (the weights were not updated); {where}. "
            "Lower optimisation.lr (or raise warmup), check the data, then resume=auto from that checkpoint."
        )


def export_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    processor: SpatialMLLMProcessor,
    lora_config,
    config: TrainConfig,
) -> None:
    """Writes the trained model (and processor) to output_dir in config.model.dtype; with LoRA, the model without
    LoRA plus the adapter beside it (transformers loads that folder as model + embedded adapter). The files are
    assembled in a hidden folder and moved in, then listed in the run info, written last."""
    state_dict = accelerator.get_state_dict(model)  # every process: gathers shards under ZeRO-3 / FSDP
    if not accelerator.is_main_process:
        return
    output_dir = Path(config.output_dir)
    dtype = getattr(torch, config.model.dtype)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    unwrapped = accelerator.unwrap_model(model)
    staging = new_staging_folder(output_dir, "export")
    if lora_config is None:
        unwrapped.save_pretrained(staging, state_dict=state_dict)
    else:
        base, adapter = split_lora_state_dict(unwrapped, state_dict)
        unwrapped.save_pretrained(staging, state_dict=base)
        save_adapter(staging, adapter, lora_config)
    processor.save_pretrained(staging)
    (output_dir / RUN_INFO_FILE).unlink(missing_ok=True)  # the folder is incomplete until the new run info is written
    files = move_into(staging, output_dir)
    # Written last: marks the folder complete and lists the model's own files, so that loading never picks up a
    # file an earlier run left here (the processor, saved above, carries the template).
    write_json(output_dir / RUN_INFO_FILE, {"model_id": output_dir.name, "stage": config.stage.name,
                                            "projector": unwrapped.config.projector_type,
                                            "files": sorted(files + [RUN_INFO_FILE])})


__all__ = ["NonFiniteLossError", "configure_for_stage", "load_model", "prepare_model", "train"]
