"""Training engine: config loading, which parameters train per stage (every projector), real tiny runs (loss
falls, stage 2 from a stage-1 folder, the output loads and generates, LoRA merge parity, cached vision features,
bf16 and gradient checkpointing, divergence message), and the CLI.

The helpers shared with test_resume.py and test_ddp.py (tiny base model folders, an in-memory dataset, a small
config, one torch thread) live in fixtures/training.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

# one_thread is an autouse fixture: imported here, it runs for every test of this file.
from fixtures.training import TinySamples, losses, one_thread, save_base, small_options, tiny_config  # noqa: F401
from spatial_mllm import cli
from spatial_mllm.model import RUN_INFO_FILE, SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor
from spatial_mllm.projectors import PROJECTORS
from spatial_mllm.training.checkpoint import latest_checkpoint, list_checkpoints
from spatial_mllm.training.config import TrainConfig, load_config, shipped_configs
from spatial_mllm.training.engine import NonFiniteLossError, load_model, train
from spatial_mllm.training.lora import ADAPTER_CONFIG, has_lora, inject_lora, linear_layer_names
from spatial_mllm.training.metrics import read_metrics
from spatial_mllm.training.params import configure_trainable, parameter_groups
from tiny import tiny_model

PAPER_PROJECTORS = ("mlp2x_gelu", "llava_sp_pooling", "llava_sp_cropping", "saep")


# --- shared helpers ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, base_dir) -> dict[str, Path]:
    """A stage-1 run and a stage-2 LoRA run started from its output folder."""
    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    stage1 = train(tiny_config(base_dir, root / "stage1"), TinySamples(base_dir))
    stage2 = train(tiny_config(stage1, root / "stage2", "instruct"), TinySamples(base_dir))
    return {"base": base_dir, "stage1": stage1, "stage2": stage2}


@pytest.fixture
def cli_main(monkeypatch):
    """The real `spatial-mllm` entry point with only this area's subcommands (other areas may be unfinished)."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("spatial_mllm.training.commands",))
    return cli.main


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- config --------------------------------------------------------------------------------------------------------


def test_shipped_paper_recipes():
    shipped = shipped_configs()
    for projector in PAPER_PROJECTORS:
        stage1 = load_config("llava15_stage1", [f"model.projector={projector}"])
        stage2 = load_config(str(shipped["llava15_stage2"]), [f"model.projector={projector}"])  # by path too
        assert (stage1.model.vision, stage1.model.llm) == ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5")
        assert stage1.model.projector == stage2.model.projector == projector
        assert (stage1.stage.name, stage1.data.template, stage1.optimisation.lr) == ("align", "plain", 1e-3)
        assert (stage1.optimisation.global_batch_size, stage1.optimisation.epochs) == (256, 1)
        assert (stage1.optimisation.schedule, stage1.optimisation.warmup_ratio) == ("cosine", 0.03)
        assert "558k" in stage1.data.train_json and not stage1.lora.enabled
        assert (stage2.stage.name, stage2.data.template) == ("instruct", "vicuna_v1")
        assert "665k" in stage2.data.train_json
        assert stage2.stage.init_from == stage1.output_dir  # stage 2 starts from stage 1's output folder
        assert (stage2.lora.enabled, stage2.lora.r, stage2.lora.alpha, stage2.lora.dropout) == (True, 128, 256, 0.05)
        assert (stage2.optimisation.lr, stage2.optimisation.projector_lr) == (2e-4, 2e-5)
        assert (stage2.optimisation.global_batch_size, stage2.vision.trainable) == (128, False)
    world = load_config("world_stage1", ["model.vision=v", "model.llm=l", "data.train_json=t.json"])
    assert world.model.dtype == "float32"
    assert load_config("world_stage2", ["stage.init_from=out1"]).lora.enabled


def test_config_errors_name_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"optimisation": {"lr": 1e-3, "learning_rate": 1}}))
    with pytest.raises(ValueError, match=r"bad\.yaml.*unknown key 'optimisation\.learning_rate'"):
        load_config(str(path))
    path.write_text(yaml.safe_dump({"optimisation": {"epochs": "two"}}))
    with pytest.raises(ValueError, match=r"bad\.yaml.*'optimisation\.epochs' must be int, found 'two'"):
        load_config(str(path))
    path.write_text("stage:\n  name: instruct\n  init_from: x\noptimisation:\n  lr: 2e-4\n")  # YAML 1.1 reads 2e-4 as str
    config = load_config(str(path), ["optimisation.max_steps=3", "lora.target_modules=[q_proj, v_proj]"])
    assert (config.optimisation.lr, config.optimisation.max_steps) == (2e-4, 3)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"override 'lora\.rank=4': unknown key 'lora\.rank'"):
        load_config(str(path), ["lora.rank=4"])
    with pytest.raises(ValueError, match=r"bad\.yaml with overrides: optimisation\.global_batch_size 6 is not a multiple"):
        load_config(str(path), ["optimisation.global_batch_size=6", "optimisation.micro_batch_size=4"])
    with pytest.raises(ValueError, match="lora.enabled applies to stage 'instruct' only"):
        load_config(str(path), ["stage.name=align", "lora.enabled=true"])
    with pytest.raises(FileNotFoundError, match="shipped: .*llava15_stage1"):
        load_config("no_such_recipe")
    config.optimisation.lr = "fast"  # values set in code are checked too
    with pytest.raises(ValueError, match="config: 'optimisation.lr' must be float, found 'fast'"):
        config.validate()


# --- which parameters train -------------------------------------------------------------------------------------


def stage_config(stage: str, lora: bool = True, vision: bool = False) -> TrainConfig:
    config = TrainConfig()
    config.stage.name, config.stage.init_from = stage, "unused"
    config.lora.enabled = lora and stage == "instruct"
    config.vision.trainable = vision
    config.optimisation.projector_lr = 2e-5
    return config.validate()


def assert_projector_fully_trainable(model, projector: str) -> None:
    parts = dict(model.projector.named_children())
    assert parts, projector
    for part_name, part in parts.items():
        flags = [p.requires_grad for p in part.parameters()]
        assert all(flags), f"{projector}: projector part {part_name!r} is not fully trainable"
    assert all(p.requires_grad for p in model.projector.parameters())


@pytest.mark.parametrize("projector", PROJECTORS.names())
def test_trainable_parameters_per_stage(projector):
    model, _ = tiny_model(projector, **small_options(projector))
    linear_names = linear_layer_names(model)

    configure_trainable(model, stage_config("align"))
    assert_projector_fully_trainable(model, projector)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())
    groups = parameter_groups(model, stage_config("align"))
    assert {g["name"] for g in groups} <= {"projector", "projector_no_decay"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.projector.parameters()))

    config = stage_config("instruct")
    lora_config = inject_lora(model, config.lora)
    configure_trainable(model, config)
    assert_projector_fully_trainable(model, projector)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert not any("lora_" in n for n, _ in model.projector.named_parameters())
    assert not any("lora_" in n for n, _ in model.vision_tower.named_parameters())
    lm_params = dict(model.language_model.named_parameters())
    lora_params = {n for n in lm_params if ".lora_A." in n or ".lora_B." in n}
    assert lora_params and all(lm_params[n].requires_grad for n in lora_params)
    assert not any(p.requires_grad for n, p in lm_params.items() if n not in lora_params)
    # Every Linear of the LLM but the output head carries LoRA A and B.
    wrapped = [n for n, m in model.language_model.named_modules() if hasattr(m, "lora_A")]
    n_layers = model.config.text_config.num_hidden_layers
    assert len(wrapped) == n_layers * len(linear_names) == len(lora_params) // 2
    assert lora_config.r == 128 and not any("lm_head" in n for n in wrapped)
    groups = {g["name"]: g for g in parameter_groups(model, config)}
    assert groups["projector"]["lr"] == 2e-5 and groups["language_model"]["lr"] == config.optimisation.lr

    full = stage_config("instruct", lora=False, vision=True)
    model, _ = tiny_model(projector, **small_options(projector))
    configure_trainable(model, full)
    assert all(p.requires_grad for p in model.parameters())


def test_lora_target_modules_are_checked(base_dir):
    model = SpatialMLLMForConditionalGeneration.from_pretrained(base_dir)
    config = stage_config("instruct")
    config.lora.target_modules = ["q_proj", "fc1"]
    with pytest.raises(ValueError, match=r"\['fc1'\] match no Linear layer of the LLM; its Linear layers: .*q_proj"):
        inject_lora(model, config.lora)
    config.lora.target_modules = ["q_proj", "v_proj"]
    inject_lora(model, config.lora)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "v_proj"}  # and never the vision tower's own q_proj / v_proj:
    assert not any(hasattr(m, "lora_A") for m in model.vision_tower.modules())


def test_stage1_trains_every_projector_part_and_nothing_else(tmp_path):
    base = save_base(tmp_path / "base", "llava_sp_pooling")
    before = params_of(SpatialMLLMForConditionalGeneration.from_pretrained(base))
    out = train(tiny_config(base, tmp_path / "run", "align", "optimisation.max_steps=2"), TinySamples(base))
    after = params_of(SpatialMLLMForConditionalGeneration.from_pretrained(out))
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    projector = {n for n in before if n.startswith("model.projector.")}
    assert changed == projector  # DFI included (the official release left it frozen)
    assert any(n.startswith("model.projector.dfi.") for n in changed) and any(n.startswith("model.projector.sfe.") for n in changed)


# --- real runs -----------------------------------------------------------------------------------------------------


def test_stage2_starts_from_stage1_and_trains_projector_and_lora(stage_runs):
    base = params_of(SpatialMLLMForConditionalGeneration.from_pretrained(stage_runs["base"]))
    stage1 = params_of(SpatialMLLMForConditionalGeneration.from_pretrained(stage_runs["stage1"]))
    stage2_model = SpatialMLLMForConditionalGeneration.from_pretrained(stage_runs["stage2"])
    assert has_lora(stage2_model)  # the folder loads as model + embedded adapter, whatever its name
    stage2 = params_of(stage2_model)
    for name, value in stage1.items():
        if name.startswith("model.projector."):
            assert not torch.equal(value, base[name])  # stage 1 trained it
            assert not torch.equal(stage2[name], value)  # stage 2 went on from there
            assert (stage2[name] - value).abs().max() < (value - base[name]).abs().max()  # at 1/10 of the lr
        else:
            assert torch.equal(value, base[name]), name
    lora_b = [v for n, v in stage2.items() if ".lora_B." in n]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    for name, value in stage2.items():
        if ".lora_" not in name and not name.startswith("model.projector."):
            assert torch.equal(value, stage1[name.replace(".base_layer.", ".")]), name
    files = {p.name for p in stage_runs["stage2"].iterdir()}
    assert {"config.json", "model.safetensors", ADAPTER_CONFIG, "adapter_model.safetensors", "processor_config.json",
            "tokenizer.json", "train_config.yaml", "metrics.jsonl", "loss.png", "tensorboard"} <= files
    assert len(read_metrics(stage_runs["stage2"] / "metrics.jsonl")) == 4
    events = list((stage_runs["stage2"] / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    assert (stage_runs["stage2"] / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The last checkpoint holds exactly the trainable weights, and they are the exported ones.
    trainable = load_file(latest_checkpoint(stage_runs["stage2"]) / "trainable.safetensors")
    assert set(trainable) == {n for n in stage2 if n.startswith("model.projector.") or ".lora_" in n}
    for name, value in trainable.items():
        assert torch.equal(value, stage2[name])


def test_output_folder_generates(stage_runs):
    model = SpatialMLLMForConditionalGeneration.from_pretrained(stage_runs["stage2"]).eval()
    processor = SpatialMLLMProcessor.from_pretrained(stage_runs["stage2"])
    images = [Image.new("RGB", (48, 48), (200, 30, 30)), Image.new("RGB", (60, 40), (30, 30, 200))]
    processor.tokenizer.padding_side = "left"  # batched generation
    batch = processor(images=images, text=["<image> what color", "<image> where is the circle ?"], padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert (new_tokens != model.config.image_token_id).all()


def test_merge_gives_the_same_logits(stage_runs, tmp_path, capsys, cli_main):
    merged_dir = tmp_path / "merged"
    assert cli_main(["merge", "--model", str(stage_runs["stage2"]), "--out", str(merged_dir)]) == 0
    assert not (merged_dir / ADAPTER_CONFIG).exists()
    lora_model = SpatialMLLMForConditionalGeneration.from_pretrained(stage_runs["stage2"]).eval()
    merged = SpatialMLLMForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert has_lora(lora_model) and not has_lora(merged)
    assert lora_model.state_dict().keys() != merged.state_dict().keys()
    sample = TinySamples(stage_runs["base"])[3]
    inputs = {"input_ids": sample["input_ids"][None], "pixel_values": sample["pixel_values"]}
    with torch.no_grad():
        expected, got = lora_model(**inputs).logits, merged(**inputs).logits
        base_logits = SpatialMLLMForConditionalGeneration.from_pretrained(stage_runs["stage1"])(**inputs).logits
    assert (expected - base_logits).abs().max() > 1e-4  # the adapter matters...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # ...and merging keeps its effect
    # the run's facts (template, prompt conventions) travel with the merged model
    merged_info = json.loads((merged_dir / RUN_INFO_FILE).read_text())
    lora_info = json.loads((stage_runs["stage2"] / RUN_INFO_FILE).read_text())
    assert {k: merged_info[k] for k in ("model_id", "stage", "projector")} == {k: lora_info[k] for k in ("model_id", "stage", "projector")}
    assert merged_info["files"] == sorted(p.name for p in merged_dir.iterdir())  # its own files, no adapter
    assert "adapter_model.safetensors" in lora_info["files"] and merged_info["merged_from"] == str(stage_runs["stage2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging folder left behind
    assert cli_main(["merge", "--model", str(merged_dir), "--out", str(tmp_path / "again")]) == 2
    assert "holds no LoRA adapter" in capsys.readouterr().err
    before = {p.name: p.stat().st_mtime_ns for p in merged_dir.iterdir()}
    assert cli_main(["merge", "--model", str(stage_runs["stage2"]), "--out", str(merged_dir)]) == 2
    assert f"merge --out {merged_dir} already exists and is not an empty folder" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in merged_dir.iterdir()} == before  # nothing overwritten


def test_loss_falls_on_a_tiny_overfit_batch(base_dir, tmp_path):
    config = tiny_config(
        base_dir, tmp_path / "overfit", "instruct",
        "lora.enabled=false", "optimisation.max_steps=30", "optimisation.lr=3e-3", "optimisation.projector_lr=3e-3",
        "checkpoint.every_steps=30",
    )
    train(config, TinySamples(base_dir, n=4))
    curve = losses(tmp_path / "overfit")
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.3 * curve[0], curve


def test_cached_vision_features_give_the_same_run(base_dir, tmp_path):
    encoder = SpatialMLLMForConditionalGeneration.from_pretrained(base_dir).eval().encode_vision
    train(tiny_config(base_dir, tmp_path / "pixels"), TinySamples(base_dir))
    train(tiny_config(base_dir, tmp_path / "features"), TinySamples(base_dir, encoder=encoder))
    assert TinySamples(base_dir, encoder=encoder)[0]["vision_features"][0].shape == (1, 144, 32)
    torch.testing.assert_close(losses(tmp_path / "features"), losses(tmp_path / "pixels"), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_and_bf16(base_dir, tmp_path):
    train(tiny_config(base_dir, tmp_path / "plain", "instruct"), TinySamples(base_dir))
    train(tiny_config(base_dir, tmp_path / "ckpt", "instruct", "optimisation.gradient_checkpointing=true"), TinySamples(base_dir))
    torch.testing.assert_close(losses(tmp_path / "ckpt"), losses(tmp_path / "plain"), atol=1e-5, rtol=1e-5)
    out = train(tiny_config(base_dir, tmp_path / "bf16", "instruct", "optimisation.mixed_precision=bf16"), TinySamples(base_dir))
    bf16 = losses(out)
    assert all(math.isfinite(v) for v in bf16)
    assert abs(bf16[0] - losses(tmp_path / "plain")[0]) < 0.05  # autocast really ran in bf16, not far from fp32
    assert bf16 != losses(tmp_path / "plain")
    assert SpatialMLLMForConditionalGeneration.from_pretrained(out).projector.mlp[0].weight.dtype == torch.float32
    # The paper configs: frozen weights stored in bf16, trainable ones kept in float32, export in bf16.
    out = train(
        tiny_config(base_dir, tmp_path / "bf16w", "instruct", "optimisation.mixed_precision=bf16", "model.dtype=bfloat16"),
        TinySamples(base_dir),
    )
    assert all(math.isfinite(v) for v in losses(out))
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    trainable = load_file(latest_checkpoint(out) / "trainable.safetensors")
    assert {t.dtype for t in trainable.values()} == {torch.float32}


def test_attention_kernel_and_padding_are_chosen_by_config_and_train_alike(base_dir, tmp_path):
    with pytest.raises(ValueError, match="model.attn_implementation must be one of .*'eager'.* got 'fast'"):
        tiny_config(base_dir, tmp_path / "bad", "instruct", "model.attn_implementation=fast")
    with pytest.raises(ValueError, match="data.pad_to_multiple_of must be at least 1 or null, got 0"):
        tiny_config(base_dir, tmp_path / "bad", "instruct", "data.pad_to_multiple_of=0")
    curves = {}
    for kernel in ("sdpa", "eager"):
        config = tiny_config(base_dir, tmp_path / kernel, "instruct", f"model.attn_implementation={kernel}")
        model, _ = load_model(config)
        assert model.language_model.config._attn_implementation == kernel
        assert model.vision_tower.model.config._attn_implementation == kernel
        # two text-only samples are shorter than the others: batches are padded, so the masks are exercised
        out = train(config, TinySamples(base_dir, text_only=frozenset({1, 2})))
        curves[kernel] = losses(out)
        assert SpatialMLLMForConditionalGeneration.from_pretrained(out).config.text_config._attn_implementation == "sdpa"
    torch.testing.assert_close(curves["eager"], curves["sdpa"], atol=1e-5, rtol=1e-5)
    # lengths padded to a multiple of 16: more padding, the same training
    padded = tiny_config(base_dir, tmp_path / "padded", "instruct", "data.pad_to_multiple_of=16")
    torch.testing.assert_close(losses(train(padded, TinySamples(base_dir, text_only=frozenset({1, 2})))),
                               curves["sdpa"], atol=1e-5, rtol=1e-5)
    assert load_model(tiny_config(base_dir, tmp_path / "default"))[0].language_model.config._attn_implementation == "sdpa"


def test_non_finite_loss_stops_with_step_and_checkpoint(base_dir, tmp_path):
    # Every sample after the first 2 steps (2 x 4 samples) has NaN pixels, so step 3 diverges.
    config = tiny_config(base_dir, tmp_path / "nan", "align")
    with pytest.raises(NonFiniteLossError) as caught:
        train(config, TinySamples(base_dir, nan_after=8))
    message = str(caught.value)
    assert "diverged at step 3" in message and "loss nan" in message
    last_good = tmp_path / "nan" / "checkpoints" / "step-00000002"
    assert f"the last good checkpoint is {last_good}" in message
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == ["step-00000002"]
    assert all(torch.isfinite(t).all() for t in load_file(last_good / "trainable.safetensors").values())
    assert len(read_metrics(tmp_path / "nan" / "metrics.jsonl")) == 2


def test_missing_deepspeed_is_a_clear_error(base_dir, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="asks for DeepSpeed but the deepspeed package is not installed"):
        train(tiny_config(base_dir, tmp_path / "ds"), TinySamples(base_dir))


def test_text_fields_take_yaml_words_as_typed():
    # YAML 1.1 reads "no" as false; the shipped configs' own value for mixed_precision must work as an override.
    config = load_config("world_stage2", ["optimisation.mixed_precision=no", "stage.init_from=/x"])
    assert config.optimisation.mixed_precision == "no"
    with pytest.raises(ValueError, match="'optimisation.max_steps' must be int or null, found False"):
        load_config("world_stage2", ["optimisation.max_steps=no", "stage.init_from=/x"])


def test_model_sources_and_data_files_are_checked_before_loading(tmp_path):
    with pytest.raises(ValueError, match="model.projector 'foo' is not registered; known: .*mlp2x_gelu"):
        load_config("world_stage1", ["model.vision=org/vit", "model.llm=org/llm", "model.projector=foo"])
    with pytest.raises(FileNotFoundError, match="model.llm /nope/llm: no such folder .*hub names look like org/name"):
        load_config("world_stage1", ["model.vision=org/vit", "model.llm=/nope/llm", "model.projector=saep"])
    # hub names are left to transformers (they download); only local paths are checked here
    assert load_config("world_stage1", ["model.vision=org/vit", "model.llm=llm", "model.projector=saep"]).model.llm == "llm"
    config = tiny_config(tmp_path / "no-model-needed", tmp_path / "out", "align", "data.train_json=null")
    with pytest.raises(ValueError, match="data.train_json is required"):
        train(config)
    config = tiny_config(tmp_path, tmp_path / "out", "align", f"data.train_json={tmp_path / 'missing.json'}")
    with pytest.raises(FileNotFoundError, match="data.train_json .*missing.json: no such file"):
        train(config)  # refused before stage.init_from (not a model folder here) is even looked at


def test_fsdp_without_a_gpu_is_a_clear_error(base_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="asks for FSDP, which accelerate runs on GPUs .* launch_ddp.yaml"):
        train(tiny_config(base_dir, tmp_path / "fsdp"), TinySamples(base_dir))
    assert not (tmp_path / "fsdp").exists()  # refused before anything was written


def test_fsdp_with_bf16_storage_is_a_clear_error(base_dir, tmp_path, monkeypatch):
    # FSDP shards one flat tensor per unit: float32 trainable weights beside bf16 frozen ones cannot be flattened.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    config = tiny_config(base_dir, tmp_path / "fsdp", "instruct", "model.dtype=bfloat16")
    with pytest.raises(ValueError, match="FSDP, which needs one dtype .* model.dtype is 'bfloat16' .* model.dtype=float32"):
        train(config, TinySamples(base_dir))
    assert not (tmp_path / "fsdp").exists()


def test_builds_the_model_from_its_parts(tmp_path):
    """Without stage.init_from the model is built from model.vision / llm / tokenizer folders (or hub names)."""
    model, processor = tiny_model("saep")
    model.vision_tower.model.save_pretrained(tmp_path / "vit")
    model.language_model.save_pretrained(tmp_path / "llm")
    processor.tokenizer.save_pretrained(tmp_path / "tok")
    config = tiny_config(tmp_path, tmp_path / "out", "align", "stage.init_from=null", "optimisation.max_steps=2",
                         f"model.vision={tmp_path / 'vit'}", f"model.llm={tmp_path / 'llm'}",
                         f"model.tokenizer={tmp_path / 'tok'}", "model.projector=saep")
    base = tmp_path / "probe"
    save_base(base, "saep")
    out = train(config, TinySamples(base))
    trained = SpatialMLLMForConditionalGeneration.from_pretrained(out)
    assert trained.config.projector_type == "saep" and trained.num_image_tokens == 36
    assert torch.equal(trained.language_model.embed_tokens.weight, model.language_model.embed_tokens.weight)
    assert SpatialMLLMProcessor.from_pretrained(out).num_image_tokens == 36
    with pytest.raises(ValueError, match="stage.init_from gives the whole model: leave model.vision"):
        tiny_config(tmp_path, tmp_path / "x", "align", f"model.vision={tmp_path / 'vit'}")


def test_init_from_is_checked(stage_runs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"stage.init_from .*nothing: no such folder"):
        train(tiny_config(tmp_path / "nothing", tmp_path / "a"), TinySamples(stage_runs["base"]))
    with pytest.raises(ValueError, match="holds a LoRA adapter; fold it in first: spatial-mllm merge"):
        train(tiny_config(stage_runs["stage2"], tmp_path / "b", "instruct"), TinySamples(stage_runs["base"]))
    with pytest.raises(ValueError, match="holds a 'mlp2x_gelu' model but model.projector is 'saep'"):
        train(tiny_config(stage_runs["stage1"], tmp_path / "c", "instruct", "model.projector=saep"),
              TinySamples(stage_runs["base"]))


def test_existing_checkpoints_need_resume(base_dir, tmp_path):
    config = tiny_config(base_dir, tmp_path / "run", "align", "optimisation.max_steps=2")
    train(config, TinySamples(base_dir))
    with pytest.raises(ValueError, match="already holds checkpoints of a run: set resume=auto"):
        train(config, TinySamples(base_dir))
    with pytest.raises(ValueError, match="fewer than optimisation.global_batch_size"):
        train(tiny_config(base_dir, tmp_path / "small", "align"), TinySamples(base_dir, n=3))


def test_cli_trains_from_a_llava_json_file(base_dir, tmp_path, capsys, cli_main):
    records = []
    for i in range(4):
        Image.new("RGB", (40 + 4 * i, 30), (60 * i, 20, 200 - 40 * i)).save(tmp_path / f"{i}.png")
        caption = ["a red circle left of a blue square", "the green triangle is above a small circle"][i % 2]
        records.append({"id": f"s{i}", "image": f"{i}.png",
                        "conversations": [{"from": "human", "value": "<image>\nwhat is this ?"},
                                          {"from": "gpt", "value": caption}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({
        "data": {"train_json": str(tmp_path / "train.json"), "template": "plain", "strict": True, "num_workers": 1},
        "stage": {"name": "align", "init_from": str(base_dir)},
        "optimisation": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 2},
        "output_dir": str(tmp_path / "out"),
    }))
    assert cli_main(["train", "--config", str(config_file), "optimisation.lr=2e-3"]) == 0
    assert f"trained model written to {tmp_path / 'out'}" in capsys.readouterr().out
    assert load_config(str(tmp_path / "out" / "train_config.yaml")).optimisation.lr == 2e-3
    assert len(read_metrics(tmp_path / "out" / "metrics.jsonl")) == 2
    SpatialMLLMForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert cli_main(["train", "--config", str(config_file), "optimisation.lr=fast"]) == 2
    assert "'optimisation.lr' must be float, found 'fast'" in capsys.readouterr().err
    assert cli_main(["train", "--list-configs"]) == 0
    assert "launch_zero3" in capsys.readouterr().out
