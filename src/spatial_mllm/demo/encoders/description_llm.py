"""Pretraining of the built-in world's LLM: a tiny Llama that answers the world's questions from a written scene
description, as Vicuna answers questions about a text before LLaVA shows it images.

The corpus is conversations in the `vicuna_v1` template whose first user turn holds the scene description where
LLaVA puts `<image>`, followed by the world's own questions, posed exactly as its evaluation files pose them
(short answer or multiple choice), sometimes a request for the detailed description, and a few of the world's
text-only questions. Scenes come from a pretraining world (its own seed, train split only): no test or hold-out
scene, and no held-out colour+shape pair, is ever named. Loss is on the answers only; every conversation is its own
row, whole (a question cut off from its description could only teach the answer prior, and one conversation
reading another's description would learn to mix scenes), in batches of conversations of similar length.
Training starts with the copy warm-up (`copy_warmup`), without which the model never binds an attribute to the
object a question names.
The saved folder holds the model and its tokenizer (`spatial_mllm.encoders.tokenizer`): AutoModelForCausalLM and
AutoTokenizer load it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from ...model.chat_templates import VICUNA_V1
from ...model.conversation import IGNORE_INDEX
from ..world.captions import DETAIL_PROMPTS, detailed_caption
from ..world.questions import TextPolicy, ask_all, ask_vocabulary, pose, pose_short
from ..world.records import MC_PROBABILITY
from ..world.scene import Scene, WorldConfig, derive_seed, generate_scene
from ...evaluation.metrics import score_answers
from ..pretraining import PretrainResult, Schedule, loss_summary, optimise, save_pretrained_folder
from .description import describe_scene
from .copy_warmup import copy_batch
from .phrase_tokenizer import train_phrase_tokenizer

@dataclass(frozen=True)
class DescriptionLlmConfig:
    """Model size, corpus and schedule."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    max_position_embeddings: int = 1024
    vocab_size: int = 1024
    world_seed: int = 1000  # the pretraining world, distinct from the demo's worlds
    scenes: int = 60000
    held_out_scenes: int = 200  # further pretraining-world scenes, for the held-out accuracy
    turns: tuple[int, int] = (6, 10)  # questions per conversation, inclusive
    detail_probability: float = 0.2  # a conversation also asks for the detailed description
    text_only_fraction: float = 0.02  # conversations of the world's text-only questions
    batch_tokens: int = 8192  # tokens per batch, padding included (rows of similar length)
    copy_steps: int = 700  # copy warm-up steps, before the corpus (0: none)
    copy_rows: int = 64
    copy_length: tuple[int, int] = (20, 50)  # tokens per copied sequence, inclusive
    copy_reverse_fraction: float = 0.5
    steps: int = 3000  # corpus steps, after the copy warm-up
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}, heads by kv_heads "
                             f"{self.kv_heads}")
        for name in ("steps", "batch_tokens", "copy_rows", "scenes", "held_out_scenes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.turns[0] <= self.turns[1]:
            raise ValueError(f"turns must be (low, high) with 1 <= low <= high, got {self.turns}")


def world_scenes(seed: int, count: int, offset: int = 0, world: WorldConfig | None = None) -> list[Scene]:
    """Scenes offset..offset+count of a world's train split, as `make_world` generates them."""
    world = world or WorldConfig()
    return [
        generate_scene(world, random.Random(derive_seed(seed, "scene", "train", i)), f"train_{i:06d}", "train",
                       derive_seed(seed, "noise", "train", i))
        for i in range(offset, offset + count)
    ]  # fmt: skip


def description_conversation(scene: Scene, rng: random.Random, policy: TextPolicy,
                             config: DescriptionLlmConfig) -> list[dict[str, str]]:
    """The description in the first user turn, then questions of distinct categories (the world's own forms)."""
    qas = ask_all(scene, rng, policy)
    rng.shuffle(qas)
    turns = [(posed.text, posed.answer) for posed in
             (pose(qa, rng, MC_PROBABILITY) for qa in qas[: rng.randint(*config.turns)])]
    if rng.random() < config.detail_probability:
        turns.insert(rng.randint(0, len(turns)), (rng.choice(DETAIL_PROMPTS), detailed_caption(scene, rng)))
    messages = []
    for k, (question, answer) in enumerate(turns):
        text = f"{describe_scene(scene, rng)}\n{question}" if k == 0 else question
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    return messages


def text_only_conversation(rng: random.Random) -> list[dict[str, str]]:
    posed = pose_short(ask_vocabulary(rng))
    return [{"role": "user", "content": posed.text}, {"role": "assistant", "content": posed.answer}]


def build_corpus(scenes: Sequence[Scene], config: DescriptionLlmConfig, seed: int) -> list[list[dict[str, str]]]:
    """One description conversation per scene, plus text-only conversations, in a seeded order."""
    policy = TextPolicy.for_split(WorldConfig(), "train", scenes)
    corpus = [
        description_conversation(scene, random.Random(derive_seed(seed, "llm", scene.id)), policy, config)
        for scene in scenes
    ]
    extra = round(config.text_only_fraction * len(scenes))
    corpus += [text_only_conversation(random.Random(derive_seed(seed, "llm-text", k))) for k in range(extra)]
    random.Random(derive_seed(seed, "llm-order")).shuffle(corpus)
    return corpus


def conversation_batches(encoded: Sequence[tuple[list[int], list[int]]], batch_tokens: int,
                         pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Conversations sorted by length and cut into batches of at most `batch_tokens` tokens (padding included),
    one conversation per row, padded after it: [(input ids, labels), ...] in length order."""
    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index][0]))
    batches = []
    start = 0
    while start < len(order):
        end = start + 1  # the longest of the batch is its last: grow while the padded batch fits
        while end < len(order) and (end + 1 - start) * len(encoded[order[end]][0]) <= batch_tokens:
            end += 1
        chosen = [encoded[index] for index in order[start:end]]
        width = len(chosen[-1][0])
        input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, row_labels) in enumerate(chosen):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(row_labels)] = torch.tensor(row_labels)
        batches.append((input_ids, labels))
        start = end
    return batches


def build_llama_config(config: DescriptionLlmConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
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


def held_out_accuracy(model, tokenizer, scenes: Sequence[Scene], seed: int) -> dict[str, float]:
    """Accuracy on one posed question per category of each held-out scene, with and without the description."""
    # Imported here: the diagnostics read the world, whose package (spatial_mllm.demo) imports this module.
    from ...diagnostics.text_accuracy import greedy_answers, prompt_ids

    policy = TextPolicy.for_split(WorldConfig(), "train", scenes)
    items = []
    for scene in scenes:
        rng = random.Random(derive_seed(seed, "llm-held-out", scene.id))
        for k, qa in enumerate(ask_all(scene, rng, policy)):
            posed = pose(qa, rng, MC_PROBABILITY)
            key = {"question_id": f"{scene.id}_q{k}", "category": qa.category, "format": posed.format,
                   "answer": posed.answer, "answer_text": posed.answer_text, "options": list(posed.options)}
            items.append((scene, posed.text, key))
    metrics = {}
    for name, with_description in (("with_description", True), ("without_description", False)):
        prompts = [prompt_ids(tokenizer, f"{describe_scene(s)}\n{text}" if with_description else text)
                   for s, text, _ in items]
        answers = greedy_answers(model, tokenizer, prompts)
        records = [{"question_id": key["question_id"], "text": a} for (_, _, key), a in zip(items, answers)]
        scores = score_answers(records, [key for _, _, key in items])
        metrics[f"held_out_accuracy_{name}"] = scores["overall"]
        metrics |= {f"held_out_{name}_{category}": value for category, value in scores["categories"].items()}
    return metrics


def pretrain_description_llm(
    out_dir: str | os.PathLike,
    config: DescriptionLlmConfig | None = None,
    log: Callable[[str], None] | None = None,
    **options,
) -> PretrainResult:
    """Build the corpus and tokenizer, train a LlamaForCausalLM on it and save model + tokenizer + pretraining.json
    (config and held-out metrics) to out_dir. `options` override fields of `config`.

    Deterministic by `seed` and `world_seed` for a given machine and thread count."""
    config = dataclasses.replace(config or DescriptionLlmConfig(), **options)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    corpus = build_corpus(world_scenes(config.world_seed, config.scenes), config, config.world_seed)
    # The tokenizer is trained first, on the rendered corpus (the template needs only the special tokens' text).
    texts, _ = render_jinja_template(conversations=corpus, chat_template=VICUNA_V1, bos_token="<s>",
                                     eos_token="</s>")
    with tempfile.TemporaryDirectory() as scratch:  # saved with the model at the end
        tokenizer = train_phrase_tokenizer(texts, Path(scratch) / "tokenizer", config.vocab_size)
    from ...diagnostics.text_accuracy import text_encoder  # see held_out_accuracy

    encoder = text_encoder(tokenizer)
    encoded = []
    for index, messages in enumerate(corpus):
        conversation = encoder.encode(messages, f"pretraining conversation {index}")
        encoded.append((conversation.input_ids, conversation.labels))
    batches = conversation_batches(encoded, config.batch_tokens, tokenizer.pad_token_id)
    if log is not None:
        supervised = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)
        log(f"llm corpus: {len(corpus)} conversations in {len(batches)} batches of at most {config.batch_tokens} "
            f"tokens, {supervised} supervised tokens, vocabulary {len(tokenizer)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(build_llama_config(config, tokenizer))
    copies = torch.Generator().manual_seed(config.seed + 2)
    first_copy_id = max(tokenizer.all_special_ids) + 1  # copy ordinary tokens only

    def batch_loss(step: int, drawn: torch.Tensor) -> tuple[torch.Tensor, str]:
        if step < config.copy_steps:  # the copy warm-up comes first
            input_ids, labels = copy_batch(config.copy_rows, config.copy_length, config.copy_reverse_fraction,
                                           first_copy_id, len(tokenizer), tokenizer.bos_token_id, copies)
            note = "(copy warm-up)"
        else:
            input_ids, labels = batches[int(drawn[0])]
            note = ""
        attention_mask = (input_ids != tokenizer.pad_token_id).long()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        return loss, note

    model.train()
    # One batch per step (batch_size 1 draws one of the length-grouped batches); one schedule over both phases.
    schedule = Schedule(config.copy_steps + config.steps, 1, config.lr, config.weight_decay, config.warmup_steps,
                        config.seed, betas=(0.9, 0.98))
    losses = optimise("llm", list(model.parameters()), batch_loss, len(batches), schedule, log, log_every=20)
    losses = losses[config.copy_steps :]  # the corpus loss (the copy loss is another task)
    model.eval()
    held_out = world_scenes(config.world_seed, config.held_out_scenes, offset=config.scenes)
    metrics = {
        **loss_summary(losses, 50),
        **held_out_accuracy(model, tokenizer, held_out, config.world_seed),
        "seconds": time.perf_counter() - started,
    }

    result = save_pretrained_folder(out_dir, [tokenizer, model], dataclasses.asdict(config), metrics)
    if log is not None:
        log(f"llm: held-out accuracy {metrics['held_out_accuracy_with_description']:.1%} with the description, "
            f"{metrics['held_out_accuracy_without_description']:.1%} without, {metrics['seconds']:.0f} s")
    return result


__all__ = ["DescriptionLlmConfig", "build_corpus", "conversation_batches", "pretrain_description_llm", "world_scenes"]
