"""The records of the world's files for one scene, in the LLaVA formats users already have.

Stage-1 and stage-2 samples follow LLaVA's training JSON, evaluation questions LLaVA's question JSONL (with the
answers kept apart in an answer key), existence questions POPE's files.
"""

from __future__ import annotations

import random
from typing import Any

from .captions import BRIEF_PROMPTS, DETAIL_PROMPTS, detailed_caption, object_list_caption
from .questions import (
    CATEGORIES,
    SHORT_SUFFIX,
    PosedQuestion,
    TextPolicy,
    ask_all,
    ask_vocabulary,
    existence_question,
    negative_pairs,
    pose,
    pose_short,
)
from .geometry import region_of
from .scene import Scene

# Same literal as spatial_mllm.model.IMAGE_TOKEN; not imported so that making data does not load the model code.
IMAGE_PLACEHOLDER = "<image>"
MC_PROBABILITY = 0.3  # share of questions posed as multiple choice where the category allows it
STAGE2_TURNS = (2, 5)  # questions per stage-2 conversation, inclusive
DETAIL_PROBABILITY = 0.15  # chance a stage-2 conversation also asks for a detailed description
POPE_PER_LABEL = 3  # yes questions (and as many no questions) per image and negative strategy


def caption_record(scene: Scene) -> dict[str, Any]:
    return {"id": scene.id, "image": scene.image, "caption": object_list_caption(scene)}


def stage1_record(scene: Scene, rng: random.Random) -> dict[str, Any]:
    turns = [(rng.choice(BRIEF_PROMPTS), detailed_caption(scene, rng))]
    return {"id": scene.id, "image": scene.image, "conversations": _conversation(turns, with_image=True)}


def stage2_record(scene: Scene, rng: random.Random, policy: TextPolicy,
                  emphasis: dict[str, float] | None = None) -> dict[str, Any]:
    """A multi-turn conversation about the image: a few questions of random categories and forms. `emphasis`:
    category -> weight (others 1) with which a question is drawn into the conversation; none: all alike."""
    qas = ask_all(scene, rng, policy)
    if emphasis:
        qas = _weighted_order(qas, emphasis, rng)
    else:
        rng.shuffle(qas)
    asked = [pose(qa, rng, MC_PROBABILITY) for qa in qas[: rng.randint(*STAGE2_TURNS)]]
    turns = [(posed.text, posed.answer) for posed in asked]
    if rng.random() < DETAIL_PROBABILITY:
        turns.insert(rng.randint(0, len(turns)), (rng.choice(DETAIL_PROMPTS), detailed_caption(scene, rng)))
    return {"id": scene.id, "image": scene.image, "conversations": _conversation(turns, with_image=True)}


def _weighted_order(qas: list, weights: dict[str, float], rng: random.Random) -> list:
    """The questions in a random order weighted by category (Efraimidis-Spirakis: sorting by u ** (1 / w) puts a
    question first with probability proportional to its weight)."""
    keys = [rng.random() ** (1.0 / weights.get(qa.category, 1.0)) for qa in qas]
    return [qa for _, qa in sorted(zip(keys, qas), key=lambda pair: pair[0], reverse=True)]


def text_only_record(record_id: str, rng: random.Random) -> dict[str, Any]:
    """A sample without image (no "image" key), as LLaVA's stage-2 mix has."""
    asked = [pose_short(ask_vocabulary(rng)) for _ in range(rng.randint(1, 2))]
    turns = [(posed.text, posed.answer) for posed in asked]
    return {"id": record_id, "conversations": _conversation(turns, with_image=False)}


def eval_records(scene: Scene, rng: random.Random, policy: TextPolicy) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(question, answer key) records: one question per category that is unambiguous in the scene."""
    records = []
    for k, qa in enumerate(ask_all(scene, rng, policy)):
        posed = pose(qa, rng, MC_PROBABILITY)
        question_id = f"{scene.id}_q{k}"
        question = {"question_id": question_id, "image": scene.image, "text": posed.text, "category": posed.category}
        records.append((question, _answer_key(question_id, scene, posed)))
    return records


def pope_records(scene: Scene, rng: random.Random, policy: TextPolicy, strategy: str) -> list[dict[str, Any]]:
    """POPE-style yes/no existence questions, balanced: present pairs (yes) and as many absent ones (no) drawn
    with the negative `strategy`."""
    present = sorted({obj.pair for obj in scene.objects})
    negatives = negative_pairs(scene, strategy, min(POPE_PER_LABEL, len(present)), rng, policy)
    positives = rng.sample(present, len(negatives))
    labelled = [(pair, "yes") for pair in positives] + [(pair, "no") for pair in negatives]
    rng.shuffle(labelled)
    return [
        {
            "question_id": f"{scene.id}_{strategy}_q{k}",
            "image": scene.image,
            "text": f"{existence_question(pair)}\n{SHORT_SUFFIX}",
            "label": label,
            "category": strategy,
        }
        for k, (pair, label) in enumerate(labelled)
    ]


def _answer_key(question_id: str, scene: Scene, posed: PosedQuestion) -> dict[str, Any]:
    return {
        "question_id": question_id,
        "image": scene.image,
        "category": posed.category,
        "group": CATEGORIES[posed.category],
        "format": posed.format,
        "question": posed.question,
        "answer": posed.answer,
        "answer_text": posed.answer_text,
        "options": list(posed.options),
        "involves_holdout": scene.holdout is not None and scene.holdout.object in posed.objects,
        "region": _subject_region(scene, posed.subject),
    }


def _subject_region(scene: Scene, subject: int | None) -> str | None:
    """The 3x3 region holding the centre of the object a question asks about, for accuracy by image region."""
    if subject is None:
        return None
    obj = scene.objects[subject]
    return region_of(obj.x, obj.y, scene.width, scene.height)


def _conversation(turns: list[tuple[str, str]], with_image: bool) -> list[dict[str, str]]:
    messages = []
    for k, (question, answer) in enumerate(turns):
        # LLaVA puts the image placeholder in the first human turn only.
        value = f"{IMAGE_PLACEHOLDER}\n{question}" if with_image and k == 0 else question
        messages += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return messages
