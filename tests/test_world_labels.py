"""Every sample of a generated world file is supervised on exactly its assistant answers, for each template.

This is the guard against LLaVA's silent "tokenization mismatch" (all labels masked, loss 0): the check decodes the
supervised tokens of every record and compares them with the answers read straight from the JSON file.
"""

from __future__ import annotations

import json

import pytest

from spatial_mllm.data.dataset import LlavaDataset
from fixtures.llava_data import processor_for
from spatial_mllm.model import IGNORE_INDEX, IMAGE_TOKEN
from spatial_mllm.demo.tokenizer import train_world_tokenizer, world_texts
from spatial_mllm.demo.world import make_world

NUM_IMAGE_TOKENS = 7


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    make_world(folder, seed=3, n_train=40, n_val=4, n_test=4, n_holdout=4, progress=False)
    tokenizer = train_world_tokenizer(world_texts(folder), tmp_path_factory.mktemp("tokenizer"), vocab_size=600)
    return folder, tokenizer


def supervised_runs(input_ids, labels, tokenizer) -> list[str]:
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run).strip() for run in runs]


@pytest.mark.parametrize(
    "file,template,end",
    [
        ("llava_stage1_train.json", "plain", ""),
        ("llava_stage2_train.json", "vicuna_v1", "</s>"),
        ("llava_stage2_train.json", "chat_template", "</s>"),
    ],
)
def test_every_record_is_supervised_on_exactly_its_answers(world, file, template, end):
    folder, tokenizer = world
    records = json.loads((folder / file).read_text())
    dataset = LlavaDataset(folder / file, folder, processor_for(tokenizer, template, NUM_IMAGE_TOKENS), load_images=False)
    assert len(dataset) == len(records) and not dataset.problems
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for index, record in enumerate(records):
        item = dataset.load(index)
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        answers = [turn["value"].strip() + end for turn in record["conversations"] if turn["from"] == "gpt"]
        assert supervised_runs(ids, labels, tokenizer) == answers, f"{file} record {index}"
        assert ids.count(image_id) == (NUM_IMAGE_TOKENS if "image" in record else 0)
        assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == image_id)
