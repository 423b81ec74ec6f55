"""The LLM alone on a world's questions: with the written scene description in place of the image (the ceiling a
multimodal model can reach through this LLM) and without it (the answer prior: what the question alone gives)."""

from __future__ import annotations

import os
from collections.abc import Sequence
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
from ..demo.encoders.scene_grid import cell_embeddings, cell_word_ids, place_cells
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


def text_encoder(tokenizer: PreTrainedTokenizerBase, template: str = "vicuna_v1",
                 image_tokens: int = 1) -> ConversationEncoder:
    """The multimodal models' conversation encoding for an LLM without a vision tower (no processor): the same
    template rendering, tokenisation and exact answer labels, so that an LLM pretrained through it reads prompts
    exactly as it will inside a multimodal model. Each `<image>` becomes `image_tokens` placeholder ids, for
    whatever embeddings the caller puts there."""
    return ConversationEncoder(tokenizer, resolve_chat_template(template, tokenizer), image_tokens)


def encoded_prompt(encoder: ConversationEncoder, user_text: str) -> list[int]:
    """Token ids of a one-turn prompt, up to the assistant's turn, as `encoder` tokenises training text."""
    text, _ = encoder.render([{"role": "user", "content": user_text}], add_generation_prompt=True)
    return encoder.encode_text(text)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, user_text: str, template: str = "vicuna_v1",
               image_tokens: int = 1) -> list[int]:
    """Token ids of a one-turn prompt in `template`, up to the assistant's turn, tokenised as training tokenises
    (for many prompts, build one `text_encoder` and call `encoded_prompt`)."""
    return encoded_prompt(text_encoder(tokenizer, template, image_tokens), user_text)


@torch.inference_mode()
def greedy_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                   batch_size: int = 64, max_new_tokens: int = 4,
                   image_embeds: Sequence[torch.Tensor] | None = None) -> list[str]:
    """Greedy continuations of token-id prompts, left-padded in batches, decoded without special tokens, by the
    model in eval mode (its training mode is restored after). `image_embeds[i]` (tokens, width), when given, fills
    prompt i's `<image>` positions in order."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    if image_embeds is not None and len(image_embeds) != len(prompts):
        raise ValueError(f"{len(image_embeds)} image embeddings for {len(prompts)} prompts")
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        inputs = {"input_ids": ids}
        if image_embeds is not None:
            cells = torch.stack(list(image_embeds[start : start + batch_size])).to(device)
            embeds = model.get_input_embeddings()(ids)
            inputs["inputs_embeds"] = place_cells(embeds, ids, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), cells)
        out = model.generate(**inputs, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, width:]]
    model.train(was_training)
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
    encoder = text_encoder(tokenizer, template)
    prompts = [encoded_prompt(encoder, user_turn(q, scenes[q["image"]], with_description)) for q in questions]
    answers = greedy_answers(model, tokenizer, prompts, batch_size)
    return {q["question_id"]: a for q, a in zip(questions, answers)}


def answer_from_grid(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[dict],
                     scenes: dict, grid: int, side: int, template: str = "vicuna_v1",
                     batch_size: int = 64) -> dict[str, str]:
    """Reply by question id of the LLM answering `questions` with each scene as grid cells (`scene_grid`: the
    object words under each of grid x grid patches, pooled to side x side) in place of the image: what a patch
    projector that made those cells exactly would let it answer."""
    encoder = text_encoder(tokenizer, template, side * side)
    prompts = [encoded_prompt(encoder, f"{IMAGE_TOKEN}\n{q['text']}") for q in questions]
    embedding = model.get_input_embeddings()
    with torch.no_grad():  # each scene's cells once (a scene has several questions)
        by_image = {image: cell_embeddings(embedding, cell_word_ids(scenes[image], grid, tokenizer)[None], side)[0]
                    for image in {q["image"] for q in questions}}
    cells = [by_image[q["image"]] for q in questions]
    answers = greedy_answers(model, tokenizer, prompts, batch_size, image_embeds=cells)
    return {q["question_id"]: a for q, a in zip(questions, answers)}


def text_only_results(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, world: str | os.PathLike,
                      split: str = "test", images: int | None = 100, questions: list[dict] | None = None,
                      grid_sides: Sequence[int] = ()) -> dict[str, dict]:
    """The LLM on the split's questions (as `asked_questions` selects them, read once) from text alone:
    `score_answers` with the scene description ("with_description") and without it ("without_description"), and
    the binding of its attribute replies with the description ("binding", `binding_outcomes`). With `grid_sides`
    (the patch grid first, then its poolings), also from the scene's grid cells ("with_grid<side>",
    `answer_from_grid`)."""
    chosen, keys, scenes = asked_questions(world, split, images, questions)
    replies = {name: answer_from_text(model, tokenizer, chosen, scenes, name == "with_description")
               for name in ("with_description", "without_description")}
    replies |= {f"with_grid{side}": answer_from_grid(model, tokenizer, chosen, scenes, grid_sides[0], side)
                for side in grid_sides}
    results = {}
    for name, found in replies.items():
        records = [{"question_id": question_id, "text": text} for question_id, text in found.items()]
        results[name] = score_answers(records, keys, f"{split} answers", f"{split} answer key")
    results["binding"] = binding_outcomes(replies["with_description"], keys, scenes)
    return results


__all__ = ["answer_from_grid", "answer_from_text", "asked_questions", "encoded_prompt", "greedy_answers",
           "prompt_ids", "question_prompts", "text_encoder", "text_only_results"]
