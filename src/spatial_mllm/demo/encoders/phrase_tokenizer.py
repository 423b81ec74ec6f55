"""The shipped LLM's tokenizer: byte-level BPE whose merges may cross spaces, with the world's words kept whole.

The world's text repeats long fixed phrases (the vicuna system prompt, "Answer the question using a single word or
phrase.", "Is the ... to the left or to the right of the ..."), which a word-level BPE spends 10-30 tokens on.
Letting merges cross spaces turns each into a few tokens: a stage-2 sample shrinks from about 212 to 123 tokens
(measured with 64 image tokens), and training time with it. The words that carry meaning (colours, shapes, sizes,
places, relations, digits) are split off before the merges, so they are always their own tokens, in every
combination: a held-out "red triangle" is tokenised as " red" + " triangle", exactly as the trained
"red circle" is " red" + " circle". `ASSISTANT:` and `USER:` are split off too, so no token crosses the boundary
between the prompt and a supervised answer (the label check would refuse it).
Same special tokens and vicuna chat template as `spatial_mllm.demo.tokenizer`; still lossless.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Regex, pre_tokenizers
from transformers import PreTrainedTokenizerBase

from ..tokenizer import train_byte_level_bpe
from ..world.geometry import POINTS, REGIONS
from ..world.scene import COLORS, SHAPES, SIZES

RELATION_WORDS = ("yes", "no", "left", "right", "above", "below", "larger", "smaller", "top", "bottom", "center")


def world_words() -> tuple[str, ...]:
    """Words always kept as their own tokens, longest first (so the regex prefers "triangles" to "triangle")."""
    words = {*COLORS, *SHAPES, *(f"{shape}s" for shape in SHAPES), *SIZES, *RELATION_WORDS}
    for place in (*REGIONS, *POINTS):
        words.update(place.split())
    return tuple(sorted(words, key=lambda word: (-len(word), word)))


def phrase_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    words = "|".join(world_words())
    isolated = Regex(rf" ?(?:{words})\b| ?\d|ASSISTANT:|USER:")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(isolated, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip


def train_phrase_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1024,
                           max_token_chars: int = 64) -> PreTrainedTokenizerBase:
    """Train on `texts` (rendered conversations), save to out_dir and return the tokenizer loaded from there."""
    return train_byte_level_bpe(texts, out_dir, vocab_size, phrase_pre_tokenizer(), max_token_length=max_token_chars)


__all__ = ["phrase_pre_tokenizer", "train_phrase_tokenizer", "world_words"]
