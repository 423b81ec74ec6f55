"""The LLM alone on a world's questions: with the written scene description in place of the image (the ceiling a
multimodal model can reach through this LLM) and without it (the answer prior: what the question alone gives)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..model.chat_templates import resolve_chat_template
from ..model.configuration import IMAGE_TOKEN
from ..model.conversation import ConversationEncoder
from ..demo.world.make import split_files
from ..evaluation.metrics import score_answers
from ..evaluation.records import read_jsonl
from ..demo.encoders.description import describe_scene
from .binding import binding_outcomes
from .probe import read_scenes


def question_prompts(
    world: str | os.PathLike, split: str, images: int | None = None
) -> tuple[list[dict], list[dict], dict]:
    """(questions, answer-key records, scene by image path) of the split's first `images` images."""
    world = Path(world)
    files = split_files(split)
    if "questions" not in files:
        raise ValueError(f"split {split!r} has no evaluation questions; use val, test or holdout")
    scenes = {scene.image: scene for scene in read_scenes(world, split, images)}
    questions = [q for q in read_jsonl(world / files["questions"]) if q["image"] in scenes]
    keys = [k for k in read_jsonl(world / files["answer_key"]) if k["image"] in scenes]
    return questions, keys, scenes


def user_turn(question: dict, scene, with_description: bool) -> str:
    """The first user turn: the description where the image would go (LLaVA's `<image>\\n` position), or nothing."""
    if IMAGE_TOKEN in question["text"]:
        raise ValueError(f"question {question['question_id']!r} already holds {IMAGE_TOKEN}")
    return f"{describe_scene(scene)}\n{question['text']}" if with_description else question["text"]


def text_encoder(tokenizer: PreTrainedTokenizerBase, template: str = "vicuna_v1") -> ConversationEncoder:
    """The multimodal models' conversation encoding for a text-only LLM (no images, so no processor): the same
    template rendering, tokenisation and exact answer labels, so that an LLM pretrained through it reads prompts
    exactly as it will inside a multimodal model."""
    return ConversationEncoder(tokenizer, resolve_chat_template(template, tokenizer), 1)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, user_text: str, template: str = "vicuna_v1") -> list[int]:
    """Token ids of a one-turn prompt in `template`, up to the assistant's turn, tokenised as training tokenises."""
    encoder = text_encoder(tokenizer, template)
    text, _ = encoder.render([{"role": "user", "content": user_text}], add_generation_prompt=True)
    return encoder.encode_text(text)


@torch.inference_mode()
def greedy_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                   batch_size: int = 64, max_new_tokens: int = 4) -> list[str]:
    """Greedy continuations of token-id prompts, left-padded in batches, decoded without special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, width:]]
    return answers


def asked_questions(world: str | os.PathLike, split: str = "test", images: int | None = 100,
                    questions: list[dict] | None = None) -> tuple[list[dict], list[dict], dict]:
    """(questions, answer-key records, scene by image path): the split's questions of its first `images` images, or
    exactly `questions` when given (each must be about a scene of the split)."""
    chosen, keys, scenes = question_prompts(world, split, images if questions is None else None)
    if questions is not None:
        wanted = {q["question_id"] for q in questions}
        chosen, keys = questions, [k for k in keys if k["question_id"] in wanted]
    missing = [q["image"] for q in chosen if q["image"] not in scenes]
    if missing:
        raise ValueError(f"{len(missing)} questions name images that are not {split} scenes of {world}, "
                         f"e.g. {missing[0]}")
    return chosen, keys, scenes


def answer_from_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[dict],
                     scenes: dict, with_description: bool = True, template: str = "vicuna_v1",
                     batch_size: int = 64) -> dict[str, str]:
    """Reply by question id of the LLM answering `questions` from the text alone, with or without the scene
    description in place of the image."""
    prompts = [prompt_ids(tokenizer, user_turn(q, scenes[q["image"]], with_description), template)
               for q in questions]
    was_training = model.training
    model.eval()
    answers = greedy_answers(model, tokenizer, prompts, batch_size)
    model.train(was_training)
    return {q["question_id"]: a for q, a in zip(questions, answers)}


def text_only_results(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, world: str | os.PathLike,
                      split: str = "test", images: int | None = 100,
                      questions: list[dict] | None = None) -> dict[str, dict]:
    """The LLM on the split's questions (as `asked_questions` selects them, read once) from text alone:
    `score_answers` with the scene description ("with_description") and without it ("without_description"), and
    the binding of its attribute replies with the description ("binding", `binding_outcomes`)."""
    chosen, keys, scenes = asked_questions(world, split, images, questions)
    results = {}
    for name, with_description in (("with_description", True), ("without_description", False)):
        replies = answer_from_text(model, tokenizer, chosen, scenes, with_description)
        records = [{"question_id": question_id, "text": text} for question_id, text in replies.items()]
        results[name] = score_answers(records, keys, f"{split} answers", f"{split} answer key")
        if with_description:
            results["binding"] = binding_outcomes(replies, keys, scenes)
    return results


__all__ = ["answer_from_text", "asked_questions", "greedy_answers", "prompt_ids", "question_prompts", "text_encoder",
           "text_only_results"]
