"""Nothing a user wrote is lost, and no model loads wrong in silence: each bad input or fault of the adversarial
audit, through the real command line. Every case checks the exit code, that the message names the place (file,
record, field, key) and, where user files are involved, that they are byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from fixtures.training import TinySamples, one_thread, save_base, tiny_config  # noqa: F401
from spatial_mllm import cli
from spatial_mllm.model import SpatialMLLMForConditionalGeneration
from spatial_mllm.model.loading import load_model_folder
from spatial_mllm.training.checkpoint import list_checkpoints
from spatial_mllm.training.engine import train
from tiny import save_sharpened_model, tiny_model


def checksums(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the given files and folders."""
    found = {}
    for path in paths:
        for file in sorted([path] if path.is_file() else path.rglob("*")):
            if file.is_file():
                found[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def no_traceback(message: str) -> bool:
    return "Traceback" not in message


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_sharpened_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def questions(tmp_path) -> Path:
    """Three questions about two good images."""
    (tmp_path / "images").mkdir()
    for name, colour in (("red.png", (220, 30, 30)), ("blue.png", (30, 30, 220))):
        Image.new("RGB", (40, 40), colour).save(tmp_path / "images" / name)
    rows = [
        {"question_id": "q0", "image": "red.png", "text": "what color is the circle ?", "category": "color"},
        {"question_id": "q1", "image": "blue.png", "text": "what color is the square ?", "category": "color"},
        {"question_id": "q2", "image": "red.png", "text": "is there a red square ?", "category": "existence"},
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def eval_args(model_dir: Path, questions: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", model_dir, "--questions", questions, "--images", questions.parent / "images",
            "--out", out, "--max-new-tokens", "2", "--quiet", *extra]


# --- data loss ---------------------------------------------------------------------------------------------------


def test_eval_out_equal_to_questions_is_refused(model_dir, questions, capsys):
    before = checksums(questions)
    code, message = run(capsys, *eval_args(model_dir, questions, questions))
    assert code == 2 and no_traceback(message)
    assert f"--out {questions} is also the input --questions" in message
    assert checksums(questions) == before


def test_eval_keeps_existing_answers_unless_overwrite(model_dir, questions, capsys):
    out = questions.parent / "answers.jsonl"
    assert run(capsys, *eval_args(model_dir, questions, out))[0] == 0
    scores = out.with_suffix(".scores.json")
    before = checksums(out, scores)
    code, message = run(capsys, *eval_args(model_dir, questions, out))
    assert code == 2 and f"--out {out} already exists; pass --overwrite" in message
    assert checksums(out, scores) == before
    out.unlink()  # the scores file alone is protected too
    code, message = run(capsys, *eval_args(model_dir, questions, out))
    assert code == 2 and f"scores file {scores} already exists" in message
    assert run(capsys, *eval_args(model_dir, questions, out, "--overwrite"))[0] == 0


def test_eval_out_that_is_a_folder_fails_before_any_work(model_dir, questions, capsys):
    folder = questions.parent / "answers"
    folder.mkdir()
    code, message = run(capsys, *eval_args(model_dir, questions, folder))
    assert code == 2 and f"--out {folder} is a folder; name the file to write" in message
    assert list(questions.parent.glob("*.tmp*")) == [] and list(folder.iterdir()) == []


def user_folder(root: Path) -> Path:
    """A folder of a user's own files that happen to have model-like names."""
    root.mkdir()
    (root / "config.json").write_text('{"mine": true}')
    (root / "model.safetensors").write_bytes(b"my weights")
    (root / "tokenizer.json").write_text("{}")
    (root / "notes.txt").write_text("do not lose me")
    return root


def test_train_into_a_folder_of_user_files_is_refused(tmp_path, capsys):
    base = save_base(tmp_path / "base")
    target = user_folder(tmp_path / "mine")
    before = checksums(target)
    with pytest.raises(ValueError, match=r"output_dir .*mine holds files that are not a spatial-mllm run .*config\.json"):
        train(tiny_config(base, target), TinySamples(base))
    with pytest.raises(ValueError, match="not a spatial-mllm run"):  # overwrite never touches files not ours
        train(tiny_config(base, target, "align", "overwrite=true"), TinySamples(base))
    assert checksums(target) == before


def test_data_tokenizer_keeps_an_existing_folder(tmp_path, capsys):
    world = tmp_path / "world"
    world.mkdir()
    (world / "train.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                                      {"from": "gpt", "value": "hello there"}]}]))
    target = user_folder(tmp_path / "tok")
    before = checksums(target)
    code, message = run(capsys, "data", "tokenizer", "--world", world, "--out", target)
    assert code == 2 and no_traceback(message)
    assert f"--out {target} already exists and is not an empty folder; pass --overwrite" in message
    assert checksums(target) == before


def test_report_keeps_a_users_report(tmp_path, model_dir, questions, capsys):
    out = questions.parent / "answers.jsonl"
    key = questions.parent / "key.jsonl"
    key.write_text("".join(json.dumps({"question_id": f"q{i}", "category": c, "type": "short", "answer": "red"}) + "\n"
                           for i, c in enumerate(["color", "color", "existence"])))
    assert run(capsys, *eval_args(model_dir, questions, out, "--answer-key", key))[0] == 0
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("my own notes")
    before = checksums(report)
    code, message = run(capsys, "report", "--runs", out.with_suffix(".scores.json"), "--out", report)
    assert code == 2 and "report.md" in message and "--overwrite" in message
    assert checksums(report) == before


# --- silently wrong ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    base = save_base(root / "base")
    torch.set_num_threads(1)
    return train(tiny_config(base, root / "run", "instruct"), TinySamples(base))


def test_a_run_folder_is_replaced_only_with_overwrite_and_a_stale_adapter_is_never_loaded(lora_run, tmp_path):
    base = lora_run.parent / "base"
    lora_run = Path(shutil.copytree(lora_run, tmp_path / "lora"))  # the module's run stays as it was
    full_ft = tiny_config(base, lora_run, "instruct", "lora.enabled=false", "optimisation.projector_lr=null")
    with pytest.raises(ValueError, match=r"already holds checkpoints of a run: set resume=auto .* overwrite=true"):
        train(full_ft, TinySamples(base))
    assert (lora_run / "adapter_model.safetensors").is_file()  # refused: nothing was touched

    # A stale adapter copied beside a full fine-tune's model is not the model's: loading leaves it out.
    plain = train(tiny_config(base, tmp_path / "full", "instruct", "lora.enabled=false"), TinySamples(base))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (plain / name).write_bytes((lora_run / name).read_bytes())
    model, _ = load_model_folder(plain)
    assert not any(".lora_" in name for name, _ in model.named_parameters())
    # (transformers alone would attach it: the folder's run info is what tells the adapter is not the model's)
    assert any(".lora_" in name for name, _ in SpatialMLLMForConditionalGeneration.from_pretrained(plain).named_parameters())
    sample = TinySamples(base)[0]
    inputs = {"input_ids": sample["input_ids"][None], "pixel_values": sample["pixel_values"]}

    # With overwrite=true the earlier run's own files (its adapter included) are replaced.
    replaced = train(tiny_config(base, lora_run, "instruct", "lora.enabled=false", "overwrite=true"), TinySamples(base))
    assert not (replaced / "adapter_model.safetensors").exists()
    with torch.inference_mode():
        assert torch.isfinite(load_model_folder(replaced)[0](**inputs).logits).all()


def test_weights_of_another_projector_are_refused(tmp_path, questions, capsys):
    folder = save_sharpened_model(tmp_path / "model")
    other, _ = tiny_model("saep")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, folder / "model.safetensors")
    before = checksums(folder)
    out = tmp_path / "answers.jsonl"
    code, message = run(capsys, *eval_args(folder, questions, out))
    assert code == 2 and no_traceback(message)
    assert f"model folder {folder}: the weights do not fit its config.json (mlp2x_gelu projector): missing" in message
    assert not out.exists() and not out.with_suffix(".scores.json").exists()
    assert checksums(folder) == before
    with pytest.raises(ValueError, match=f"stage.init_from {folder}: the weights do not fit"):
        train(tiny_config(folder, tmp_path / "run"), TinySamples(folder))


def test_a_tokenizer_of_another_vocabulary_is_refused(tmp_path, questions, capsys):
    folder = save_sharpened_model(tmp_path / "model")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = "red", "blue"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, other ids: answers would be garbage
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    code, message = run(capsys, *eval_args(folder, questions, tmp_path / "answers.jsonl"))
    assert code == 2 and no_traceback(message)
    assert f"{folder}: the tokenizer's vocabulary differs from the one the model was built with" in message


def test_a_processor_of_another_projector_is_named(tmp_path, questions, capsys):
    folder = save_sharpened_model(tmp_path / "model")
    processor_config = json.loads((folder / "processor_config.json").read_text())
    processor_config["num_image_tokens"] = 70  # what a LLaVA-SP processor would say
    (folder / "processor_config.json").write_text(json.dumps(processor_config))
    code, message = run(capsys, *eval_args(folder, questions, tmp_path / "answers.jsonl"))
    assert code == 2 and no_traceback(message)
    assert "processor_config.json expands each image to 70 tokens but the model's mlp2x_gelu projector makes 144" in message


@pytest.mark.parametrize("bad_path", ["../outside.png", "/etc/hostname"])
def test_image_paths_stay_inside_the_image_folder(model_dir, questions, capsys, bad_path):
    Image.new("RGB", (8, 8)).save(questions.parent / "outside.png")
    lines = questions.read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "image": bad_path})
    questions.write_text("\n".join(lines) + "\n")
    out = questions.parent / "answers.jsonl"
    code, message = run(capsys, *eval_args(model_dir, questions, out))
    assert code == 0
    assert f"{questions} line 2 field 'image': {bad_path}" in message
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == ["q0", "q2"]
    # The same rule for training data: the record is reported, named by file, record and field.
    data = questions.parent / "train.json"
    data.write_text(json.dumps([{"id": 0, "image": bad_path, "conversations": [
        {"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": "red"}]}]))
    code, message = run(capsys, "data", "check", data, "--images", questions.parent / "images")
    assert code == 1 and f"{data} record 0 field 'image': {bad_path}" in message
    assert "bad_image_path" in message


@pytest.mark.parametrize(
    "override,named",
    [
        ("optimisation.weight_decay=-5", "optimisation.weight_decay must be >= 0"),
        ("optimisation.seed=-1", "optimisation.seed must be >= 0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("data.max_length=-5", "data.max_length must be positive"),
        ("data.template=llama_2", "data.template 'llama_2' is not a known template"),
    ],
)
def test_config_values_out_of_range_name_the_key(tmp_path, capsys, override, named):
    code, message = run(capsys, "train", "--config", "world_stage2", "stage.init_from=/x", override)
    assert code == 2 and no_traceback(message) and named in message and "world_stage2.yaml" in message


def test_config_file_not_utf8_names_the_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"stage:\n  name: \xff\xfe\n")
    code, message = run(capsys, "train", "--config", path)
    assert code == 2 and f"{path}: not UTF-8 text" in message


# --- tracebacks and misleading errors ----------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a size over Pillow's decompression-bomb limit (the data itself is tiny)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_eval_skips_truncated_and_oversized_images_by_line(model_dir, questions, capsys):
    images = questions.parent / "images"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(images / "big.png")
    big = (images / "big.png").read_bytes()
    (images / "truncated.png").write_bytes(big[: len(big) // 2])  # the header is fine, the data ends early
    (images / "bomb.png").write_bytes(png_claiming(20_000, 20_000))
    lines = questions.read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "image": "truncated.png"})
    lines[2] = json.dumps({**json.loads(lines[2]), "image": "bomb.png"})
    questions.write_text("\n".join(lines) + "\n")
    out = questions.parent / "answers.jsonl"
    code, message = run(capsys, *eval_args(model_dir, questions, out))
    assert code == 0 and no_traceback(message)
    assert f"{questions} line 2 field 'image': cannot decode truncated.png" in message
    assert f"{questions} line 3 field 'image': too large to decode" in message
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == ["q0"]
    # --strict stops at the first, naming it.
    lines[2] = json.dumps({**json.loads(lines[2]), "image": "red.png"})
    questions.write_text("\n".join(lines) + "\n")
    code, message = run(capsys, *eval_args(model_dir, questions, questions.parent / "strict.jsonl", "--strict"))
    assert code == 2 and f"{questions} line 2 field 'image': cannot decode truncated.png" in message


def test_a_generated_image_token_is_text(model_dir):
    model, processor = load_model_folder(model_dir)
    image_id = model.config.image_token_id
    assert image_id in model.generation_config.suppress_tokens  # never emitted by generate
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nwhat color ?"}],
                                           add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (40, 40), (200, 0, 0))], text=prompt)
    with torch.inference_mode():
        prefill = model(**inputs, use_cache=True)
        # A decode step fed the image token (as a model without suppression could emit it) reads it as text.
        step = model(input_ids=torch.tensor([[image_id]]), cache=prefill.past_key_values, use_cache=True)
    assert torch.isfinite(step.logits).all()


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, capsys):
    base = save_base(tmp_path / "base")
    full = train(tiny_config(base, tmp_path / "full", "align", "optimisation.max_steps=4"), TinySamples(base))
    settings = ("optimisation.max_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=3")
    # Run to the end, damage the newest checkpoint and the one before it (two ways), remove the final export, and
    # resume: the run must restart from the newest checkpoint that loads, and end with the same weights.
    train(tiny_config(base, tmp_path / "cut", "align", *settings), TinySamples(base))
    checkpoints = list_checkpoints(tmp_path / "cut")
    newest, older = checkpoints[-1], checkpoints[-2]
    (newest / "trainable.safetensors").write_bytes(b"\0" * 64)  # zeroed
    state = older / "trainer_state.json"
    state.write_text("{not json")
    for name in ("model.safetensors", "spatial_mllm_run.json"):
        (tmp_path / "cut" / name).unlink()
    train(tiny_config(base, tmp_path / "cut", "align", *settings, "resume=auto"), TinySamples(base))
    printed = capsys.readouterr().out
    assert f"skipping checkpoint {newest}" in printed and "trainable.safetensors" in printed
    assert f"skipping checkpoint {older}" in printed and "trainer_state.json" in printed
    assert load_file(tmp_path / "cut" / "model.safetensors").keys() == load_file(full / "model.safetensors").keys()
    for key, value in load_file(full / "model.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "cut" / "model.safetensors")[key]), key


def test_a_half_deleted_checkpoint_is_cleared(tmp_path):
    base = save_base(tmp_path / "base")
    out = tmp_path / "run"
    train(tiny_config(base, out, "align"), TinySamples(base))
    # What a kill in the middle of pruning leaves: the doomed checkpoint already renamed aside, partly deleted.
    doomed = out / "checkpoints" / ".tmp-delete-step-00000001"
    doomed.mkdir()
    (doomed / "trainable.safetensors").write_bytes(b"half")
    train(tiny_config(base, out, "align", "resume=auto"), TinySamples(base))
    assert not doomed.exists()
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000004"]


def test_a_truncated_adapter_is_named_by_merge(lora_run, tmp_path, capsys):
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in lora_run.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    adapter = folder / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    code, message = run(capsys, "merge", "--model", folder, "--out", tmp_path / "merged")
    assert code == 2 and no_traceback(message)
    assert f"{adapter}: not a readable safetensors file" in message
    assert not (tmp_path / "merged").exists()


def test_an_unreachable_hub_name_fails_at_once(tmp_path, capsys):
    data = tmp_path / "train.json"
    data.write_text("[]")
    code, message = run(capsys, "data", "check", data, "--tokenizer", "nope/tok")
    assert code == 2 and no_traceback(message)
    assert "--tokenizer 'nope/tok' is neither a folder here nor in the local Hugging Face cache" in message


def test_question_file_not_utf8_is_reported_by_line(model_dir, questions, capsys):
    questions.write_bytes(questions.read_bytes() + b'{"question_id": "q9", "text": "caf\xe9 ?"}\n')
    code, message = run(capsys, *eval_args(model_dir, questions, questions.parent / "answers.jsonl"))
    assert code == 0 and f"{questions} line 4 field '<line>': not UTF-8 text" in message


def test_data_files_are_checked_before_the_model(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"stage": {"name": "align", "init_from": str(tmp_path / "nothing")},
                                      "data": {"train_json": str(tmp_path / "missing.json")}}))
    code, message = run(capsys, "train", "--config", config)
    assert code == 2 and f"data.train_json {tmp_path / 'missing.json'}: no such file" in message


def test_a_stopped_eval_keeps_its_answers_so_far(model_dir, questions, monkeypatch):
    from spatial_mllm.evaluation import runner
    from spatial_mllm.evaluation.evaluate import evaluate_questions

    real = runner.generate_batch
    calls = []

    def stops_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_batch", stops_on_second_batch)
    model, processor = load_model_folder(model_dir)
    out = questions.parent / "answers.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate_questions(model, processor, questions, questions.parent / "images", out, batch_size=2,
                           max_new_tokens=2, progress=False)
    assert not out.exists()  # never a partial run under the final name
    kept = [json.loads(line)["question_id"] for line in runner.partial_path(out).read_text().splitlines()]
    assert kept == ["q0", "q1"]
