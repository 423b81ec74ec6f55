"""`import_llava`: an official LLaVA-1.5 or LLaVA-SP release (LoRA over a base, or full) as our model folder.

What LLaVA's own loader does, done strictly: the LLM is built from the release's config (its Llama fields) with the
base's (LoRA) or the release's (full) weights; the projector comes from `non_lora_trainables.bin` or the full
checkpoint under the official names; the peft adapter is merged (or kept beside the model); the vision tower is
`mm_vision_tower` or the one the user names. Every tensor of the files is used exactly once or the import stops
naming it; the rotary `inv_freq` buffers of old checkpoints are dropped after checking that the config recomputes
them. The variant is read from the weight names, never from the folder name. The output is an ordinary model folder
with the processor, the `vicuna_v1` chat template and LLaVA's image padding, written atomically.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import is_protobuf_available, is_sentencepiece_available

from ..cache import tokenizer_digest
from ..files import check_output, write_folder, write_json
from ..hub import looks_local, resolve_source
from ..model import (
    RUN_INFO_FILE,
    VICUNA_V1,
    SpatialMLLMConfig,
    SpatialMLLMForConditionalGeneration,
    SpatialMLLMProcessor,
    add_image_token,
    image_processor_for,
)
from ..projectors import PROJECTORS
from ..model.adapter import PEFT_PREFIX, attach_adapter_weights, merge_lora
from ..training.lora import save_adapter, split_lora_state_dict
from ..vision.tower import VisionTower
from .checkpoint_files import read_weights, weight_names
from .llava_release import (
    NON_LORA_TRAINABLES,
    USUAL_VISION_TOWER,
    LlavaRelease,
    local_folder,
    projector_options,
    projector_variant,
    read_release,
    spatial_grid,
    strip_prefix,
)
from .official import is_official_projector_key, official_projector_state, read_state_dict

SENTENCEPIECE_FILE = "tokenizer.model"  # kept beside our tokenizer, so export-llava can hand LLaVA its slow tokenizer
TOKENIZER_FILES = ("tokenizer.json", SENTENCEPIECE_FILE, "tokenizer_config.json")
INV_FREQ = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class ImportResult:
    out_dir: Path
    kind: str  # "lora" or "full"
    projector: str
    num_image_tokens: int
    parameters: int
    dtype: torch.dtype
    vision_tower: str
    tokenizer_from: Path
    kept_lora: bool


def import_llava(
    model_path: str | Path,
    out_dir: str | Path,
    model_base: str | Path | None = None,
    projector: str | None = None,
    vision_tower: str | None = None,
    keep_lora: bool = False,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Reads the release at `model_path` (and the base LLM at `model_base` for a LoRA release) and writes our model
    folder to `out_dir` (an existing one is replaced only with `overwrite`). `projector`, when given, must be what
    the weights hold.
    `dtype`: of the written model (default: the release's own, as LLaVA runs it); a LoRA adapter is merged in it."""
    out_dir = Path(out_dir)
    check_output(out_dir, "--out", inputs={"--model-path": model_path, "--model-base": model_base,
                                           "--vision-tower": vision_tower}, overwrite=overwrite, folder=True)
    release = read_release(model_path)
    release.check_prompting()
    if projector is not None and projector not in PROJECTORS:
        raise ValueError(f"--projector {projector!r} is not a registered projector ({', '.join(PROJECTORS.names())})")
    base = _base_folder(release, model_base, keep_lora)
    # The projector first: the variant decides the rest, and a wrong one is refused before the LLM is read.
    variant, projector_state, where = _release_projector(release, projector)
    tower, tower_name = _load_vision_tower(release, vision_tower)
    tokenizer, tokenizer_from = _load_tokenizer(release, base)

    source = f"--model-base {base}" if base is not None else f"--model-path {release.folder}"
    state, inv_freq, projector_state = _read_llm(base or release.folder, source, projector_state)
    options = projector_options(variant, projector_state, where)
    _check_vision(release, tower, tower_name, projector_state)
    llama_config = release.llama_config()
    language_model = _build_language_model(llama_config, state, inv_freq, source)
    del state  # the LLM holds these tensors now; keeping the dict would keep a second copy alive through .to(dtype)
    if len(tokenizer) > llama_config.vocab_size:
        raise ValueError(
            f"the tokenizer of {tokenizer_from} has {len(tokenizer)} tokens but the LLM's embeddings hold "
            f"{llama_config.vocab_size}: not the tokenizer this model was trained with"
        )
    # <image> is added after the LLM's vocabulary: the model embeds image positions from the projector, so the
    # LLM keeps exactly the released embeddings and output head.
    image_token_id = add_image_token(tokenizer)
    config = SpatialMLLMConfig(
        vision_config=tower.config.to_dict(),
        text_config=llama_config.to_dict(),
        projector_type=variant,
        projector_options=options,
        image_token_id=image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tokenizer_digest=tokenizer_digest(tokenizer),
    )
    with init_empty_weights(include_buffers=False):  # the projector's tensors come from the release, never random
        model = SpatialMLLMForConditionalGeneration(config, vision_tower=tower, language_model=language_model)
    dtype = dtype or release.dtype()
    model.projector.to(dtype)  # still empty: the release's tensors are converted once, straight to the dtype
    model.projector.load_state_dict(official_projector_state(model.projector, projector_state, where), strict=True,
                                    assign=True)
    del projector_state
    model = model.to(dtype).eval()

    lora_config = None
    if release.kind == "lora":
        lora_config = _attach_release_adapter(model, release)
        if not keep_lora:
            merge_lora(model)
    processor = SpatialMLLMProcessor(
        image_processor_for(tower_name),
        tokenizer,
        num_image_tokens=model.num_image_tokens,
        pad_images=release.pads_images,
        chat_template=VICUNA_V1,  # what the LLaVA-1.5 and LLaVA-SP releases were trained with
    )
    facts = {
        "model_id": out_dir.name,
        "stage": "imported",
        "projector": variant,
        "imported_from": {
            "model_path": str(release.folder.resolve()),
            "model_base": str(base.resolve()) if base is not None else None,
            "vision_tower": tower_name,
        },
    }
    _write(out_dir, model, processor, lora_config if keep_lora else None, tokenizer_from, facts)
    parameters = sum(p.numel() for p in model.parameters())
    return ImportResult(out_dir, release.kind, variant, model.num_image_tokens, parameters, dtype, tower_name,
                        tokenizer_from, keep_lora)


def _read_llm(folder: Path, source: str, projector_state: dict | None) -> tuple[dict, dict, dict]:
    """(LLM tensors, rotary inv_freq buffers, projector tensors) of the LLM's files: a full release's projector is
    in them, a LoRA release's base must hold none."""
    state = read_weights(folder, source.split()[0])
    inv_freq = {k: state.pop(k) for k in [k for k in state if INV_FREQ.match(k)]}
    in_llm_files = [k for k in state if is_official_projector_key(k)]
    if projector_state is None:
        return state, inv_freq, {k: state.pop(k) for k in in_llm_files}
    if in_llm_files:
        raise ValueError(f"{source} holds projector weights ({sorted(in_llm_files)[:3]}); a LoRA release's base is "
                         "the plain LLM its adapter was trained over")
    return state, inv_freq, projector_state


def _write(out_dir: Path, model, processor, kept_lora: LoraConfig | None, tokenizer_from: Path, facts: dict) -> None:
    """Our model folder, whole or not at all: model (+ adapter beside it), processor, sentencepiece model, facts."""

    def build(staging: Path) -> None:
        if kept_lora is not None:
            weights, adapter = split_lora_state_dict(model, model.state_dict())
            model.save_pretrained(staging, state_dict=weights)
            save_adapter(staging, adapter, kept_lora)
        else:
            model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if (tokenizer_from / SENTENCEPIECE_FILE).is_file():
            shutil.copy2(tokenizer_from / SENTENCEPIECE_FILE, staging / SENTENCEPIECE_FILE)
        # last, listing the folder's own files (the loader attaches an adapter only when it is listed), as runs do
        files = sorted([path.name for path in staging.iterdir()] + [RUN_INFO_FILE])
        write_json(staging / RUN_INFO_FILE, {**facts, "files": files})

    write_folder(out_dir, build)


def _release_projector(release: LlavaRelease, expected: str | None) -> tuple[str, dict | None, str]:
    """(variant, projector tensors if already read, where they are): from `non_lora_trainables.bin` (small, read
    whole) or from the names in a full release's index or header (its tensors are read with the LLM)."""
    if release.kind == "lora":
        where = str(release.folder / NON_LORA_TRAINABLES)
        state = strip_prefix(read_state_dict(release.folder / NON_LORA_TRAINABLES))
        other = sorted(k for k in state if not is_official_projector_key(k))
        if other:
            raise ValueError(f"{where} holds tensors that are not projector weights: {other[:6]}")
        names = set(state)
    else:
        where, state = str(release.folder), None
        names = {k for k in weight_names(release.folder, "--model-path") if is_official_projector_key(k)}
    variant = projector_variant(names, where)
    if expected is not None and expected != variant:
        raise ValueError(f"{where} holds a {variant} projector (read from its weight names), not {expected} (--projector)")
    if state is not None:
        projector_options(variant, state, where)  # refuses an incomplete LLaVA-SP checkpoint before more is read
    return variant, state, where


# --- the parts ----------------------------------------------------------------------------------------------------------


def _base_folder(release: LlavaRelease, model_base, keep_lora: bool) -> Path | None:
    if release.kind == "lora":
        if model_base is None:
            raise ValueError(
                f"--model-path {release.folder} is a LoRA release: pass --model-base, the LLM its adapter was trained "
                "over (lmsys/vicuna-7b-v1.5 for the LLaVA-1.5 and LLaVA-SP releases)"
            )
        return local_folder(model_base, "--model-base")
    if keep_lora:
        raise ValueError(f"--keep-lora: --model-path {release.folder} is a full release, it has no LoRA adapter")
    if model_base is not None and _has_tokenizer(release.folder):
        raise ValueError(
            f"--model-base is for LoRA releases; --model-path {release.folder} is a full release with its own "
            "weights and tokenizer"
        )
    return local_folder(model_base, "--model-base") if model_base is not None else None


def _load_vision_tower(release: LlavaRelease, override: str | None) -> tuple[VisionTower, str]:
    hint = (f"pass --vision-tower with the CLIP the release was trained with, usually {USUAL_VISION_TOWER} (a hub "
            "name or a local folder)")
    if override:
        name, where = resolve_source(override, "--vision-tower"), "--vision-tower"
    else:
        name = str(release.setting("mm_vision_tower") or release.setting("vision_tower") or "")
        where = f"{release.config_file}: mm_vision_tower"
        if not name:
            raise ValueError(f"{release.config_file}: no mm_vision_tower; {hint}")
        if looks_local(name) and not Path(name).expanduser().exists():
            raise ValueError(
                f"{where} {name!r} resolves to nothing here (a path on the machine the release was made on); {hint}"
            )
        try:
            name = resolve_source(name, where)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{err}; or {hint}") from None
    try:
        return VisionTower.from_pretrained(name), name
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{where} {name!r}: no vision tower could be loaded from it ({reason}); {hint}") from None


def _check_vision(release: LlavaRelease, tower: VisionTower, name: str, projector_state: dict[str, torch.Tensor]) -> None:
    width = release.setting("mm_hidden_size")
    geometry = tower.geometry
    if width is not None and width != geometry.width:
        raise ValueError(
            f"{release.config_file}: mm_hidden_size is {width} but the vision tower {name} is {geometry.width} wide; "
            f"pass --vision-tower with the CLIP the release was trained with, usually {USUAL_VISION_TOWER}"
        )
    grid = spatial_grid(projector_state)
    if grid is not None and grid != geometry.grid:
        raise ValueError(
            f"the release's LLaVA-SP convolutions were trained on a {grid}x{grid} patch grid but the vision tower {name} "
            f"gives {geometry.grid}x{geometry.grid}; pass --vision-tower with the CLIP it was trained with, usually "
            f"{USUAL_VISION_TOWER} (336 px / 14 = 24)"
        )


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _load_tokenizer(release: LlavaRelease, base: Path | None) -> tuple[PreTrainedTokenizerBase, Path]:
    """The release's tokenizer (full releases ship one), else the base's (LoRA releases do not)."""
    folder = release.folder if _has_tokenizer(release.folder) else base
    if folder is None or not _has_tokenizer(folder):
        raise FileNotFoundError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in --model-path {release.folder}"
            + (f" or --model-base {base}" if base is not None else "; pass --model-base, the LLM it was trained from")
        )
    if (folder / SENTENCEPIECE_FILE).is_file() and not (folder / "tokenizer.json").is_file():
        missing = [name for name, ok in (("sentencepiece", is_sentencepiece_available()),
                                         ("protobuf", is_protobuf_available())) if not ok]
        if missing:
            raise ValueError(
                f"{folder / SENTENCEPIECE_FILE} is a sentencepiece tokenizer: reading it needs the Python package(s) "
                f"{' and '.join(missing)} (pip install {' '.join(missing)}; ./scripts/setup.sh installs them)"
            )
    try:
        return AutoTokenizer.from_pretrained(folder), folder
    except (OSError, ValueError) as err:
        raise ValueError(f"the tokenizer in {folder} does not load: {err}") from None


def _build_language_model(config, state: dict[str, torch.Tensor], inv_freq: dict[str, torch.Tensor], source: str):
    """The LLM with exactly `state`'s tensors (no random init, no copy), every name and shape checked."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: the weights do not match the LLM its config.json describes: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(tensor.shape)} but config.json gives {tuple(expected[key].shape)}"
            )
    for key in tied:  # some savers store a tied tensor anyway: it must then be the tensor it is tied to
        target = state[model.all_tied_weights_keys[key]]
        if key in state and not torch.equal(state[key], target):
            raise ValueError(f"{source}: {key} differs from the tensor it is tied to")
        state[key] = target
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    computed = model.model.rotary_emb.inv_freq
    for key, stored in inv_freq.items():
        if stored.shape != computed.shape or not torch.allclose(stored.float(), computed.float(), rtol=1e-3, atol=0):
            raise ValueError(
                f"{source}: {key} differs from the rotary frequencies its config.json gives (rope_theta / "
                "rope_scaling): the LLM would not compute what it was trained to"
            )
    return model


def _attach_release_adapter(model: SpatialMLLMForConditionalGeneration, release: LlavaRelease) -> LoraConfig:
    """Injects the release's LoRA layers into our LLM and loads the adapter, strictly. LLaVA saves the adapter of
    its whole causal LM, whose decoder is `model.`; ours sits at `model.language_model.`, so names are moved there
    and LoRA is placed only on the LLM's layers the adapter names."""
    path = release.adapter_weights()
    weights = read_state_dict(path)
    strange = sorted(k for k in weights if not k.startswith(PEFT_PREFIX) or ".lora_" not in k)
    if strange:
        raise ValueError(f"{path} holds tensors that are not LoRA weights in peft's naming: {strange[:5]}")
    released = LoraConfig.from_pretrained(release.folder)
    if released.modules_to_save:
        raise ValueError(f"{release.folder / 'adapter_config.json'}: modules_to_save {released.modules_to_save} is not supported")
    layer_names = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights})
    config = dataclasses.replace(
        released,
        target_modules=rf"model\.language_model\.(.*\.)?({'|'.join(map(re.escape, layer_names))})",
        task_type=None,
        base_model_name_or_path=None,
        inference_mode=False,
    )
    outside = sorted(k for k in weights if not k.startswith(PEFT_PREFIX + "model."))
    if outside:
        raise ValueError(f"{path} holds LoRA weights outside the LLM's decoder: {outside[:5]}")
    ours = {"model.language_model." + k.removeprefix(PEFT_PREFIX + "model."): v for k, v in weights.items()}
    attach_adapter_weights(model, config, ours, str(path))
    return config


__all__ = ["ImportResult", "SENTENCEPIECE_FILE", "import_llava"]
