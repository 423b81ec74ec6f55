"""A small byte-level BPE tokenizer trained on the built-in world's text, saved as a transformers tokenizer folder.

Byte-level BPE is lossless (any text decodes back to itself, no unknown tokens), which exact label verification
needs. Special tokens: <s> (added at the start by default, as Llama does), </s>, <unk>, <pad>, <image>; the chat
template renders exactly the `vicuna_v1` format, so the `vicuna_v1` and `chat_template` templates agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..files import write_folder
from ..model.chat_templates import VICUNA_SYSTEM, VICUNA_V1
from ..model.configuration import IMAGE_TOKEN

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

def train_world_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 2048
) -> PreTrainedTokenizerBase:
    """Train on `texts`, save to out_dir (loadable with AutoTokenizer.from_pretrained) and return the loaded tokenizer.

    The template words (system text, USER:, ASSISTANT:) are added to the training text so they get merged tokens.
    """
    return train_byte_level_bpe(texts, out_dir, vocab_size, pre_tokenizers.ByteLevel(add_prefix_space=False),
                                preamble=[f"{VICUNA_SYSTEM} USER: question ASSISTANT: answer"])


def train_byte_level_bpe(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int,
                         pre_tokenizer: pre_tokenizers.PreTokenizer, preamble: Sequence[str] = (),
                         **trainer_options: Any) -> PreTrainedTokenizerBase:
    """A byte-level BPE with the world's special tokens, trained on `preamble` then `texts` (`trainer_options` go
    to tokenizers' BpeTrainer), saved by `save_world_tokenizer`."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    # <image> is a special token: keep it out of the merges learnt from the text.
    corpus = [text.replace(IMAGE_TOKEN, " ") for text in texts]
    if not corpus:
        raise ValueError("no text to train the tokenizer on")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        **trainer_options,
    )
    backend.train_from_iterator([*preamble, *corpus], trainer)
    return save_world_tokenizer(backend, out_dir)


def save_world_tokenizer(backend: Tokenizer, out_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A trained BPE backend as a transformers tokenizer (<s> prepended as Llama does, the special tokens, the
    vicuna chat template), saved to out_dir whole and loaded back from there."""
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=[IMAGE_TOKEN],
    )
    tokenizer.chat_template = VICUNA_V1
    write_folder(out_dir, tokenizer.save_pretrained)  # appears whole or not at all
    return AutoTokenizer.from_pretrained(out_dir)


def world_texts(world_dir: str | os.PathLike) -> Iterator[str]:
    """Text of a generated world folder, searched recursively: the turns of every LLaVA JSON file (*.json holding a
    list of records) and the "text", "answer" and "caption" fields of every JSONL file (questions, answer keys,
    captions). Other files (the manifest, scene graphs) hold no such fields and add nothing."""
    root = Path(world_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"world folder not found: {world_dir}")
    for path in sorted(root.rglob("*.json")):
        data = _load_json(path, path.read_text(encoding="utf-8"), 0)
        for record in data if isinstance(data, list) else []:
            for turn in record.get("conversations", []) if isinstance(record, dict) else []:
                if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                    yield turn["value"]
    for path in sorted(root.rglob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            row = _load_json(path, line, number) if line.strip() else None
            if isinstance(row, dict):
                yield from (row[key] for key in ("text", "answer", "caption") if isinstance(row.get(key), str))


def _load_json(path: Path, text: str, line: int) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {line}" if line else f"line {err.lineno} column {err.colno}"
        raise ValueError(f"{path}: not valid JSON at {where}: {err.msg}") from None


__all__ = ["SPECIAL_TOKENS", "save_world_tokenizer", "train_byte_level_bpe", "train_world_tokenizer", "world_texts"]
