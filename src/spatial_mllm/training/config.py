"""The training config: nested dataclasses, read from YAML with `a.b=value` command-line overrides by OmegaConf.

OmegaConf checks every key against the dataclasses (and resolves `${...}` interpolations, with which the shipped
recipes name their folders after the projector); its errors are turned into one line that names the key and the
file (or the override) it came from. Shipped recipes live in `spatial_mllm/configs/*.yaml` and are found by name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ..hub import looks_local
from ..model.chat_templates import template_names

STAGES = ("align", "instruct")
MIXED_PRECISION = ("no", "bf16")
SCHEDULES = ("cosine", "linear", "constant_with_warmup")
DTYPES = ("float32", "bfloat16", "float16")
# transformers' attention kernels; flash_attention_2 needs its package and a GPU (transformers says so when missing)
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flex_attention")


@dataclass
class ModelSection:
    """What to build when `stage.init_from` is null: hub names or local folders, and the projector."""

    vision: str | None = None
    llm: str | None = None
    tokenizer: str | None = None  # null: the LLM's own tokenizer
    projector: str | None = None  # a registered projector name; with init_from, null means "whatever it holds"
    projector_options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"  # storage dtype of the frozen weights; trainable weights are always kept in float32
    # The attention kernel the run trains with (ATTENTION); null: transformers' default (sdpa). Not saved with the
    # model. For tiny models on CPU, eager is the faster one (benchmarks/training.py: torch's CPU flash-attention
    # backward dominated the world recipe's step)
    attn_implementation: str | None = None

    def check_sources(self) -> None:
        """A registered projector, and local folders that exist, before minutes are spent loading the others."""
        from ..projectors import PROJECTORS

        if self.projector is not None and self.projector not in PROJECTORS.names():
            raise ValueError(f"model.projector {self.projector!r} is not registered; known: {', '.join(PROJECTORS.names())}")
        for name in ("vision", "llm", "tokenizer"):
            value = getattr(self, name)
            if value is not None and looks_local(value) and not Path(value).expanduser().exists():
                raise FileNotFoundError(
                    f"model.{name} {value}: no such folder (a local path; hub names look like org/name)"
                )


@dataclass
class DataSection:
    train_json: str | None = None
    image_folder: str | None = None  # null: the folder of train_json
    template: str | None = "plain"  # a conversation template name; null: the model processor's own
    max_length: int = 2048
    overlong: str = "truncate"  # "truncate" or "drop" samples longer than max_length
    strict: bool = False  # stop at the first bad record instead of skipping it
    num_workers: int = 0
    group_by_length: bool = False  # batches of samples of similar length (less padding), as LLaVA's recipe does
    # Round each batch's padded length up to a multiple of this (null: no rounding). On CPU, oneDNN compiles and
    # caches kernels per matrix shape, and every new batch length made new ones: measured over 200 world stage-2
    # steps on one thread, peak memory 2.37 GB without, 1.23 GB with 16 (45 s vs 47 s).
    pad_to_multiple_of: int | None = None


@dataclass
class StageSection:
    name: str = "align"  # "align": projector only; "instruct": projector + LLM (LoRA or full)
    init_from: str | None = None  # a folder that SpatialMLLMForConditionalGeneration.from_pretrained loads


@dataclass
class OptimisationSection:
    lr: float = 1e-3
    projector_lr: float | None = None  # null: same as lr
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; overrides epochs when set
    global_batch_size: int = 256  # samples per optimiser step over all processes
    micro_batch_size: int = 16  # samples per forward pass on one process
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False

    def grad_accum_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"optimisation.global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size {self.micro_batch_size} x {world_size} process(es) = {per_step}"
            )
        return self.global_batch_size // per_step


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # "all-linear": every Linear of the LLM except its output head; or a list of Linear names ("q_proj", ...).
    target_modules: str | list[str] = "all-linear"


@dataclass
class VisionSection:
    trainable: bool = False


@dataclass
class CheckpointSection:
    every_steps: int = 500
    keep_last: int = 2


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    stage: StageSection = field(default_factory=StageSection)
    optimisation: OptimisationSection = field(default_factory=OptimisationSection)
    lora: LoraSection = field(default_factory=LoraSection)
    vision: VisionSection = field(default_factory=VisionSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    output_dir: str = "outputs/run"
    resume: str | None = None  # null: start fresh; "auto": latest checkpoint in output_dir; or a checkpoint folder
    overwrite: bool = False  # replace a run already in output_dir (never anything else)

    def validate(self) -> TrainConfig:
        """Checks types (also of values set in code) and ranges; raises ValueError naming the key."""
        checked = _to_config(lambda: OmegaConf.structured(self), "config")
        for section in dataclasses.fields(self):
            setattr(self, section.name, getattr(checked, section.name))
        checks: list[tuple[bool, str]] = [
            (self.stage.name in STAGES, f"stage.name must be one of {STAGES}, got {self.stage.name!r}"),
            (self.optimisation.mixed_precision in MIXED_PRECISION,
             f"optimisation.mixed_precision must be one of {MIXED_PRECISION}, got {self.optimisation.mixed_precision!r}"),
            (self.optimisation.schedule in SCHEDULES,
             f"optimisation.schedule must be one of {SCHEDULES}, got {self.optimisation.schedule!r}"),
            (self.model.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {self.model.dtype!r}"),
            (self.model.attn_implementation in (None, *ATTENTION),
             f"model.attn_implementation must be one of {ATTENTION} or null, got {self.model.attn_implementation!r}"),
            (self.data.overlong in ("truncate", "drop"), f"data.overlong must be 'truncate' or 'drop', got {self.data.overlong!r}"),
            (self.data.template is None or self.data.template in template_names(),
             f"data.template {self.data.template!r} is not a known template; known: {', '.join(template_names())}"),
            (self.optimisation.lr > 0, "optimisation.lr must be positive"),
            (self.optimisation.weight_decay >= 0, f"optimisation.weight_decay must be >= 0, got {self.optimisation.weight_decay}"),
            (self.optimisation.seed >= 0, f"optimisation.seed must be >= 0, got {self.optimisation.seed}"),
            (self.data.num_workers >= 0, f"data.num_workers must be >= 0, got {self.data.num_workers}"),
            (self.data.pad_to_multiple_of is None or self.data.pad_to_multiple_of >= 1,
             f"data.pad_to_multiple_of must be at least 1 or null, got {self.data.pad_to_multiple_of}"),
            (self.data.max_length > 0, f"data.max_length must be positive, got {self.data.max_length}"),
            (self.optimisation.projector_lr is None or self.optimisation.projector_lr > 0,
             "optimisation.projector_lr must be positive or null"),
            (self.optimisation.global_batch_size > 0 and self.optimisation.micro_batch_size > 0,
             "optimisation.global_batch_size and micro_batch_size must be positive"),
            (self.optimisation.epochs > 0, "optimisation.epochs must be positive"),
            (self.optimisation.max_steps is None or self.optimisation.max_steps > 0,
             "optimisation.max_steps must be positive or null"),
            (0 <= self.optimisation.warmup_ratio < 1, "optimisation.warmup_ratio must be in [0, 1)"),
            (self.checkpoint.every_steps > 0, "checkpoint.every_steps must be positive"),
            (self.checkpoint.keep_last > 0, "checkpoint.keep_last must be positive"),
            (self.lora.r > 0 and self.lora.alpha > 0, "lora.r and lora.alpha must be positive"),
            (0 <= self.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
            (not (self.lora.enabled and self.stage.name == "align"),
             "lora.enabled applies to stage 'instruct' only: stage 'align' trains the projector alone"),
            (self.stage.init_from is not None or bool(self.model.vision and self.model.llm and self.model.projector),
             "set model.vision, model.llm and model.projector, or stage.init_from (a model folder to start from)"),
            (self.stage.init_from is None or not (self.model.vision or self.model.llm or self.model.tokenizer),
             "stage.init_from gives the whole model: leave model.vision, model.llm and model.tokenizer unset"),
            (self.optimisation.max_grad_norm >= 0, "optimisation.max_grad_norm must be >= 0 (0: no clipping)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.model.check_sources()
        if self.optimisation.global_batch_size % self.optimisation.micro_batch_size:
            raise ValueError(
                f"optimisation.global_batch_size {self.optimisation.global_batch_size} is not a multiple of "
                f"micro_batch_size {self.optimisation.micro_batch_size}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading ---------------------------------------------------------------------------------------------------------


def shipped_configs() -> dict[str, Path]:
    """Name -> path of the YAML files shipped in spatial_mllm/configs."""
    folder = resources.files("spatial_mllm") / "configs"
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_config(name_or_path: str) -> Path:
    """A YAML path as given, or a shipped config by name (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if path.stem in shipped and len(path.parts) == 1:
        return shipped[path.stem]
    raise FileNotFoundError(
        f"config {name_or_path!r} is neither a file nor a shipped config; shipped: {', '.join(sorted(shipped))}"
    )


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (or shipped name) plus `a.b=value` overrides (values parsed as YAML)."""
    path = resolve_config(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level, found {type(raw).__name__}")
    merged = _to_config(lambda: OmegaConf.merge(OmegaConf.structured(TrainConfig), raw), str(path), resolve=False)
    for override in overrides:
        merged = _apply(merged, override)
    config = _to_config(lambda: merged, str(path) + (" with overrides" if overrides else ""))
    try:
        return config.validate()
    except ValueError as err:
        raise ValueError(f"{path}{' with overrides' if overrides else ''}: {err}") from None


def apply_override(config: TrainConfig, override: str) -> None:
    """Applies one `section.key=value` override to a config in code, in place."""
    updated = _to_config(lambda: _apply(OmegaConf.structured(config), override), f"override {override!r}")
    for section in dataclasses.fields(config):
        setattr(config, section.name, getattr(updated, section.name))


def _apply(merged, override: str):
    """The OmegaConf config with one `a.b=value` override merged in; the value is read as YAML, except that a text
    field keeps YAML 1.1's words (no/yes/on/off) as typed instead of as booleans."""
    source = f"override {override!r}"
    if "=" not in override:
        raise ValueError(f"{source}: expected key=value, e.g. optimisation.lr=2e-4")
    dotted, text = (part.strip() for part in override.split("=", 1))
    if not dotted:
        raise ValueError(f"{source}: no key before '='")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if isinstance(value, bool) and _takes_text(dotted):
        value = text
    try:
        return OmegaConf.merge(merged, _nested(dotted, value))
    except OmegaConfBaseException as err:
        raise ValueError(f"{source}: {_describe(err, dotted)}") from None


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    tree: Any = value
    for part in reversed(dotted.split(".")):
        tree = {part: tree}
    return tree


def _to_config(make, source: str, resolve: bool = True):
    """Run an OmegaConf step; with `resolve`, end with the TrainConfig object. Errors become one line naming
    `source` and the key."""
    try:
        made = make()
        return OmegaConf.to_object(made) if resolve else made
    except OmegaConfBaseException as err:
        raise ValueError(f"{source}: {_describe(err)}") from None


def _describe(err: OmegaConfBaseException, key: str | None = None) -> str:
    key = getattr(err, "full_key", None) or key
    if isinstance(err, ConfigKeyError) or "not in" in str(getattr(err, "msg", "")):
        return f"unknown key {key!r}"
    hint = _field_type(key) if key else None
    if hint is not None and getattr(err, "value", None) is not None:
        expected = " or ".join(_type_name(option) for option in _type_options(hint))
        return f"{key!r} must be {expected}, found {err.value!r}"
    return f"{key!r}: {str(getattr(err, 'msg', err)).splitlines()[0]}"


def _field_type(dotted: str) -> Any:
    """The type hint of a dotted key of TrainConfig, or None if there is no such key."""
    target: Any = TrainConfig
    for part in dotted.split("."):
        if not (dataclasses.is_dataclass(target) and part in {f.name for f in dataclasses.fields(target)}):
            return None
        target = typing.get_type_hints(target)[part]
    return target


def _takes_text(dotted: str) -> bool:
    hint = _field_type(dotted)
    return hint is not None and str in _type_options(hint)


def _type_options(hint: Any) -> tuple[Any, ...]:
    """The types a hint allows: the members of a Union (`int | None`), else the hint itself."""
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint)


def save_config(config: TrainConfig, path: str | Path) -> None:
    from ..files import write_text

    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


__all__ = [
    "CheckpointSection",
    "DataSection",
    "LoraSection",
    "ModelSection",
    "OptimisationSection",
    "StageSection",
    "TrainConfig",
    "VisionSection",
    "apply_override",
    "load_config",
    "resolve_config",
    "save_config",
    "shipped_configs",
]
