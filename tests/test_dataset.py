"""LlavaDataset and DataCollator on a hand-written LLaVA file with one record of each bad kind and real PNGs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from fixtures.llava_data import (
    CORRUPT_IMAGE_RECORD,
    GOOD_RECORDS,
    IMAGE_SIZE,
    LONG_RECORD,
    MIXED,
    SCAN_PROBLEMS,
    processor_for,
    world_tokenizer,
    write_mixed_dataset,
)
from spatial_mllm.data.collator import DataCollator
from spatial_mllm.data.dataset import DataError, LlavaDataset, fit_length
from spatial_mllm.model import IGNORE_INDEX, IMAGE_TOKEN, LabelMismatchError

N = 4  # image tokens per image


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return world_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def data(tmp_path):
    return write_mixed_dataset(tmp_path)


def dataset(data, tokenizer, template: str = "vicuna_v1", **options) -> LlavaDataset:
    json_path, folder = data
    return LlavaDataset(json_path, folder, processor_for(tokenizer, template, N), **options)


def supervised_text(tokenizer, item) -> str:
    ids = item["input_ids"][item["labels"] != IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_scan_reports_each_bad_record_with_its_field(data, tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        ds = dataset(data, tokenizer)
    assert {p.index: (p.field, str(p.kind)) for p in ds.problems} == SCAN_PROBLEMS
    # Usable: the good records plus the two whose problems only show when loading.
    assert [ds.record(i).index for i in range(len(ds))] == sorted(GOOD_RECORDS + [CORRUPT_IMAGE_RECORD, LONG_RECORD])
    assert ds.num_records == 14
    missing = next(p for p in ds.problems if p.index == 2)
    assert str(missing) == (
        f"{data[0]} record 2 field 'image': file not found: images/missing.png (looked in {data[1]})"
    )
    unknown = next(p for p in ds.problems if p.index == 9)
    assert "unknown role 'bing'" in unknown.message
    assert "missing_image: 1" in caplog.text and "malformed_conversation: 5" in caplog.text


def test_problems_found_while_loading_are_reported_and_skipped(data, tokenizer, caplog):
    long_ds = dataset(data, tokenizer, max_length=10_000)
    lengths = {long_ds.record(i).index: len(long_ds[i]["input_ids"]) for i in range(len(long_ds))}
    limit = max(lengths[i] for i in GOOD_RECORDS)
    assert lengths[LONG_RECORD] > limit

    ds = dataset(data, tokenizer, max_length=limit, overlong="drop")
    with caplog.at_level(logging.WARNING):
        served = [ds[i]["id"] for i in range(len(ds))]
    # The corrupt image (position 2) and the over-long record (position 4) are replaced by the next usable one.
    assert served == [
        "good-image", "good-text-multiturn", "good-roles-and-system", "good-roles-and-system", "good-image"
    ]
    late = {p.index: (p.field, str(p.kind)) for p in ds.problems if p.index not in SCAN_PROBLEMS}
    assert late == {CORRUPT_IMAGE_RECORD: ("image", "unreadable_image"), LONG_RECORD: ("conversations", "overlong")}
    assert f"record {CORRUPT_IMAGE_RECORD} field 'image': cannot decode images/corrupt.png" in caplog.text
    counts = ds.problem_counts()
    assert counts["unreadable_image"] == 1 and counts["overlong"] == 1 and sum(counts.values()) == 11
    assert f"{lengths[LONG_RECORD]} tokens, more than max_length {limit}" in ds.report()


def test_strict_raises_at_the_first_problem(data, tokenizer, tmp_path):
    missing = r"llava_mixed\.json record 2 field 'image': file not found: images/missing\.png"
    with pytest.raises(DataError, match=missing):
        dataset(data, tokenizer, strict=True)
    # Problems found while loading raise too.
    records = json.loads(MIXED.read_text())
    only_good_and_corrupt = tmp_path / "two.json"
    only_good_and_corrupt.write_text(json.dumps([records[0], records[CORRUPT_IMAGE_RECORD]]))
    ds = dataset((only_good_and_corrupt, data[1]), tokenizer, strict=True)
    assert ds[0]["id"] == "good-image"
    with pytest.raises(DataError, match=r"two\.json record 1 field 'image': cannot decode images/corrupt\.png"):
        ds[1]


def test_item_holds_image_tokens_pixels_and_exact_labels(data, tokenizer):
    ds = dataset(data, tokenizer)
    item = ds[0]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, labels = item["input_ids"], item["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    positions = (ids == image_id).nonzero().flatten().tolist()
    assert positions == list(range(positions[0], positions[0] + N))
    assert (labels[positions] == IGNORE_INDEX).all()
    assert supervised_text(tokenizer, item).strip() == "The square is red.</s>"
    # LLaVA moves the placeholder to the start of its turn.
    assert f"USER: {IMAGE_TOKEN * N}\nWhat colour is the square? ASSISTANT:" in tokenizer.decode(ids)
    assert item["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(item["pixel_values"][0, :, 0, 0], torch.tensor([220, 20, 20]) / 255)

    with_system = ds[3]  # record 11: "user"/"assistant" roles and a system turn
    assert with_system["id"] == "good-roles-and-system"
    assert tokenizer.decode(with_system["input_ids"]).startswith("<s>You describe scenes briefly. USER: <image>")
    assert torch.allclose(with_system["pixel_values"][0, :, 0, 0], torch.tensor([20, 20, 220]) / 255)


def test_text_only_use_keeps_image_tokens_without_pixels(data, tokenizer):
    ds = dataset(data, tokenizer, load_images=False)
    item = ds[2]  # the corrupt image is never opened when images are served otherwise
    assert item["id"] == "corrupt-image" and item["pixel_values"] is None
    assert (item["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum() == N


def test_plain_template_takes_single_exchanges(data, tokenizer):
    ds = dataset(data, tokenizer, template="plain")
    template_problems = {p.index for p in ds.problems if str(p.kind) == "template"}
    assert template_problems == {1, 11}  # multi-turn, and a system turn
    item = ds[0]
    assert tokenizer.decode(item["input_ids"]) == f"<s>{IMAGE_TOKEN * N}The square is red.\n"
    assert supervised_text(tokenizer, item) == "The square is red.\n"


def test_truncation_never_cuts_image_tokens(data, tokenizer):
    full = dataset(data, tokenizer, max_length=10_000)[0]
    cut = dataset(data, tokenizer, max_length=len(full["input_ids"]) - 3)[0]
    assert cut["id"] == "good-image"
    assert torch.equal(cut["input_ids"], full["input_ids"][:-3]) and torch.equal(cut["labels"], full["labels"][:-3])
    assert (cut["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum() == N

    # A limit inside the image block drops the sample instead.
    image_end = int((full["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).nonzero().max()) + 1
    ds = dataset(data, tokenizer, max_length=image_end - 1)
    with pytest.raises(DataError, match=f"record 0 field 'conversations': .*image tokens end at {image_end}"):
        ds.load(0)


def test_fit_length_cases():
    ids, labels = [1, 9, 9, 5, 6, 7], [-100, -100, -100, -100, 6, 7]
    assert fit_length(ids, labels, 9, 6, "drop") == (ids, labels)
    assert fit_length(ids, labels, 9, 5, "truncate") == ([1, 9, 9, 5, 6], [-100, -100, -100, -100, 6])
    assert fit_length(ids, labels, 9, 5, "drop") == "6 tokens, more than max_length 5"
    assert "image tokens end at 3" in fit_length(ids, labels, 9, 2, "truncate")
    assert "no supervised token is left" in fit_length(ids, labels, 9, 4, "truncate")


def test_tokenizer_that_loses_text_raises_even_when_not_strict(data):
    # Whitespace word-level tokenizer: "red.</s>" decodes as "<unk> </s>"; this must never train silently.
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, "The", "square", "is"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    lossy = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                    pad_token="<pad>", extra_special_tokens=[IMAGE_TOKEN])
    with pytest.raises(LabelMismatchError, match="llava_mixed.json record 0: supervised tokens decode to"):
        dataset(data, lossy)[0]


def test_bad_files_fail_clearly(tmp_path, tokenizer):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,}]')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON: .* line 1 column"):
        LlavaDataset(broken, tmp_path, processor_for(tokenizer))
    broken.write_text('{"id": 1}')
    with pytest.raises(ValueError, match="expected a JSON list of records, found a JSON dict"):
        LlavaDataset(broken, tmp_path, processor_for(tokenizer))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        LlavaDataset(tmp_path / "absent.json", tmp_path, processor_for(tokenizer))


@pytest.mark.parametrize("multiple", [None, 16])
@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_and_stacks_images_in_order(data, tokenizer, side, multiple):
    ds = dataset(data, tokenizer)
    items = [ds[3], ds[1], ds[0]]  # blue image, text only, red image
    pad = tokenizer.pad_token_id
    batch = DataCollator(pad, padding_side=side, pad_to_multiple_of=multiple)(items)
    lengths = [len(item["input_ids"]) for item in items]
    width = max(lengths) if multiple is None else (max(lengths) // 16 + 1) * 16
    assert max(lengths) % 16  # the rounding is real here
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for row, (item, length) in enumerate(zip(items, lengths)):
        real = slice(0, length) if side == "right" else slice(width - length, width)
        padding = slice(length, width) if side == "right" else slice(0, width - length)
        assert torch.equal(batch["input_ids"][row, real], item["input_ids"])
        assert torch.equal(batch["labels"][row, real], item["labels"])
        assert (batch["input_ids"][row, padding] == pad).all() and (batch["labels"][row, padding] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == length and (batch["attention_mask"][row, real] == 1).all()
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))
    assert DataCollator(pad)([ds[1]])["pixel_values"] is None
    with pytest.raises(ValueError, match="pad_to_multiple_of must be at least 1 or None, got 0"):
        DataCollator(pad, pad_to_multiple_of=0)


def test_dataloader_batches(data, tokenizer):
    ds = dataset(data, tokenizer)
    loader = DataLoader(ds, batch_size=2, collate_fn=DataCollator(tokenizer.pad_token_id))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels", "pixel_values"}
