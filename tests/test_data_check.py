"""`check_file` and the `data check` command on the hand-written file with one record of each bad kind."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from fixtures.llava_data import (
    CORRUPT_IMAGE_RECORD,
    GOOD_RECORDS,
    LONG_RECORD,
    MIXED,
    SCAN_PROBLEMS,
    world_tokenizer,
    write_mixed_dataset,
)
from fixtures.llava_data import processor_for
from spatial_mllm import cli
from spatial_mllm.data.check import check_file
from spatial_mllm.data.dataset import LlavaDataset

N = 4


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    world_tokenizer(folder)
    return folder


@pytest.fixture
def data(tmp_path):
    return write_mixed_dataset(tmp_path)


def found(problems) -> dict[int, tuple[str, str]]:
    return {p.index: (p.field, str(p.kind)) for p in problems}


def run_check(argv: list[str]) -> int:
    return cli.main(["data", "check", *argv])


def test_check_without_tokenizer_decodes_every_image(data):
    problems = check_file(*data).problems
    assert found(problems) == {**SCAN_PROBLEMS, CORRUPT_IMAGE_RECORD: ("image", "unreadable_image")}
    assert [p.index for p in problems] == sorted(p.index for p in problems)


def test_check_with_tokenizer_and_length_limit(data, tokenizer_dir):
    processor = processor_for(AutoTokenizer.from_pretrained(tokenizer_dir), "vicuna_v1", N)
    ds = LlavaDataset(data[0], data[1], processor, max_length=10_000, load_images=False)
    lengths = {ds.record(i).index: len(ds.load(i)["input_ids"]) for i in range(len(ds))}
    limit = max(lengths[i] for i in GOOD_RECORDS)
    problems = check_file(*data, processor=processor, max_length=limit, overlong="drop").problems
    assert found(problems) == {
        **SCAN_PROBLEMS,
        CORRUPT_IMAGE_RECORD: ("image", "unreadable_image"),
        LONG_RECORD: ("conversations", "overlong"),
    }
    # Truncation can keep the long record (its answer is cut), so it is no problem then.
    truncating = check_file(*data, processor=processor, max_length=limit).problems
    assert LONG_RECORD not in found(truncating)
    with pytest.raises(ValueError, match="needs a processor"):
        check_file(*data, max_length=limit)


def test_check_reports_template_problems_per_record(data, tokenizer_dir):
    processor = processor_for(AutoTokenizer.from_pretrained(tokenizer_dir), "plain", N)
    problems = check_file(*data, processor=processor).problems
    assert {i for i, (_, kind) in found(problems).items() if kind == "template"} == {1, 11}  # multi-turn, system turn


def test_check_command_prints_every_problem_and_fails(data, tokenizer_dir, capsys):
    json_path, folder = data
    assert run_check([str(json_path), "--images", str(folder), "--tokenizer", str(tokenizer_dir)]) == 1
    out = capsys.readouterr().out.splitlines()
    problem_lines = [line for line in out if " record " in line]
    assert len(problem_lines) == len(SCAN_PROBLEMS) + 1
    assert f"{json_path} record 2 field 'image': file not found: images/missing.png (looked in {folder})" in problem_lines
    assert out[-1].startswith(f"{json_path}: {len(SCAN_PROBLEMS) + 1} problem(s) in {len(SCAN_PROBLEMS) + 1} of 14 record(s) (")
    assert "unreadable_image: 1" in out[-1] and "malformed_conversation: 5" in out[-1]


def test_check_command_passes_a_clean_file(data, tokenizer_dir, capsys):
    json_path, folder = data
    records = json.loads(MIXED.read_text())
    clean = json_path.parent / "clean.json"
    clean.write_text(json.dumps([records[i] for i in GOOD_RECORDS]))
    argv = [str(clean), "--images", str(folder), "--tokenizer", str(tokenizer_dir), "--template", "chat_template"]
    assert run_check(argv) == 0
    assert capsys.readouterr().out.strip() == f"{clean}: {len(GOOD_RECORDS)} records, no problems"


def test_errors_name_the_nested_command(tmp_path, capsys):
    from spatial_mllm import cli

    assert cli.main(["data", "check", str(tmp_path / "none.json"), "--images", str(tmp_path)]) == 2
    assert f"spatial-mllm data check: error: data file not found: {tmp_path / 'none.json'}" in capsys.readouterr().err
