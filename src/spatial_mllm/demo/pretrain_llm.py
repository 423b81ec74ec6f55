"""Language-model pretraining of a tiny Llama on a world's text, for worlds where no pretrained LLM can be had.

The corpus is the world's conversations rendered exactly as training will render them (the `vicuna_v1` template by
default, so the model knows the format and where answers end), plus any other text such as captions. Documents are
packed into one token stream (each starts with <s> and ends with </s>) and trained on random fixed-length windows.
The saved folder holds the model and the tokenizer: AutoModelForCausalLM / AutoTokenizer load it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.optimization import get_cosine_schedule_with_warmup

from ..cache import code_version, digest, tokenizer_digest
from ..data.dataset import DataError, DataProblem, normalize_record, read_records
from ..model.chat_templates import resolve_chat_template
from .pretraining import PretrainResult, cached_pretraining, write_pretraining_record


@dataclass(frozen=True)
class LlmPretrainConfig:
    hidden: int = 192
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    block_size: int = 256  # covers a prompt with a projector's image tokens, so positions that far are trained
    max_position_embeddings: int = 2048
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    held_out: float = 0.05  # fraction of the texts kept out for the held-out loss
    seed: int = 0
    mixed_precision: bool = True  # bf16 autocast: 1.5x faster than fp32 on CPU at these sizes (measured)

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"hidden {self.hidden} must be divisible by heads {self.heads}, and heads by kv_heads {self.kv_heads}"
            )
        for name in ("steps", "batch_size", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.held_out < 1:
            raise ValueError(f"held_out is a fraction of the texts, strictly between 0 and 1, got {self.held_out}")


# The demo's two settings. Measured on one CPU thread: default on a 2000-image world's conversations, 125 s, held-out
# perplexity 1.44; quick on a 300-image world's, 15 s, perplexity 1.60.
LLM_DEFAULT = LlmPretrainConfig()
LLM_QUICK = LlmPretrainConfig(hidden=128, layers=2, intermediate=384, steps=100, batch_size=12, warmup_steps=8)


def conversation_texts(
    json_file: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    image_folder: str | os.PathLike,
    template: str = "vicuna_v1",
) -> list[str]:
    """The text of every record of a LLaVA JSON file, rendered by the chat template `template` exactly as training
    renders it (same record checks and `<image>` placement); a bad record raises an error naming the file and index."""
    chat_template = resolve_chat_template(template, tokenizer)
    texts = []
    for index, raw in enumerate(read_records(json_file)):
        record = normalize_record(raw, index, str(json_file), Path(image_folder))
        if isinstance(record, DataProblem):
            raise DataError(record)
        texts.append(tokenizer.apply_chat_template(list(record.messages), chat_template=chat_template, tokenize=False))
    return texts


def pack_texts(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """One token stream: each text as <s> text </s> (</s> not repeated when the text already ends with it)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to separate documents; set tokenizer.eos_token")
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {index} of the language corpus is empty or not text: {text!r}")
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream += bos + ids + ([] if ids[-1:] == [eos] else [eos])
    return torch.tensor(stream, dtype=torch.long)


def build_llama_config(config: LlmPretrainConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def _windows(stream: torch.Tensor, block_size: int) -> torch.Tensor:
    """Consecutive non-overlapping windows covering the stream (the last one may reach back to fill up)."""
    if len(stream) <= block_size:
        return stream.unsqueeze(0)
    starts = list(range(0, len(stream) - block_size, block_size)) + [len(stream) - block_size]
    return torch.stack([stream[s : s + block_size] for s in starts])


@torch.inference_mode()
def held_out_loss(model: LlamaForCausalLM, stream: torch.Tensor, block_size: int, mixed_precision: bool) -> float:
    """Mean next-token loss over the held-out stream, window by window."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for window in _windows(stream, block_size).split(16):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
            loss = model(input_ids=window.to(device), labels=window.to(device)).loss
        tokens = window.numel() - len(window)
        total, count = total + loss.item() * tokens, count + tokens
    return total / count


def pretrain_llm(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    config: LlmPretrainConfig | None = None,
    log: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
    **options,
) -> PretrainResult:
    """Train a tiny LlamaForCausalLM (vocabulary = len(tokenizer)) on `texts` and save it with the tokenizer.

    `options` override fields of `config` (default LLM_DEFAULT). Writes config.json, generation_config.json,
    model.safetensors, the tokenizer files and pretraining.json. Metrics: initial/final training loss, held-out loss
    and perplexity, tokens, seconds.
    """
    config = dataclasses.replace(config or LLM_DEFAULT, **options)
    if len(texts) < 2:
        raise ValueError(f"language-model pretraining needs at least 2 texts (some are held out), got {len(texts)}")
    started = time.perf_counter()
    device = torch.device(device)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_eval = max(1, round(config.held_out * len(texts)))
    train_stream = pack_texts([texts[i] for i in order[n_eval:]], tokenizer)
    eval_stream = pack_texts([texts[i] for i in order[:n_eval]], tokenizer)
    block = min(config.block_size, len(train_stream) - 1)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's random state
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(build_llama_config(config, tokenizer)).to(device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    generator = torch.Generator().manual_seed(config.seed + 1)
    losses: list[float] = []
    model.train()
    for step in range(config.steps):
        starts = torch.randint(0, len(train_stream) - block + 1, (config.batch_size,), generator=generator)
        batch = torch.stack([train_stream[s : s + block] for s in starts.tolist()]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, config.steps // 10) == 0:
            log(f"llm step {step + 1}/{config.steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("language-model pretraining diverged (non-finite loss); lower lr")

    model.eval()
    eval_loss = held_out_loss(model, eval_stream, block, config.mixed_precision)
    window = max(1, min(10, len(losses) // 5))
    metrics = {
        "initial_loss": sum(losses[:window]) / window,
        "final_loss": sum(losses[-window:]) / window,
        "held_out_loss": eval_loss,
        "held_out_perplexity": math.exp(eval_loss),
        "train_tokens": float(len(train_stream)),
        "tokens_seen": float(config.steps * config.batch_size * block),
        "seconds": time.perf_counter() - started,
    }
    out_dir = Path(out_dir)
    model.cpu().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_pretraining_record(out_dir, dataclasses.asdict(config), metrics)
    if log is not None:
        log(
            f"llm: held-out loss {eval_loss:.3f} (perplexity {metrics['held_out_perplexity']:.2f}), "
            f"{metrics['seconds']:.0f} s"
        )
    return PretrainResult(out_dir, metrics)


def pretrain_llm_cached(
    cache_dir: str | os.PathLike,
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    config: LlmPretrainConfig | None = None,
    log: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
    **options,
) -> PretrainResult:
    """`pretrain_llm` into `cache_dir/llm-<key>`, reusing that folder when the key (config, texts, tokenizer, this
    module's code) matches."""
    config = dataclasses.replace(config or LLM_DEFAULT, **options)
    key = digest(dataclasses.asdict(config), list(texts), tokenizer_digest(tokenizer), code_version(__file__))
    result = cached_pretraining(
        cache_dir, "llm", key, lambda tmp: pretrain_llm(texts, tokenizer, tmp, config, log, device)
    )
    if result.reused and log is not None:
        log(f"llm: reusing {result.path} (held-out perplexity {result.metrics['held_out_perplexity']:.2f})")
    return result


__all__ = [
    "LLM_DEFAULT",
    "LLM_QUICK",
    "LlmPretrainConfig",
    "build_llama_config",
    "conversation_texts",
    "held_out_loss",
    "pack_texts",
    "pretrain_llm",
    "pretrain_llm_cached",
]
