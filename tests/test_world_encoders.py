"""The built-in world's encoders: dense ViT pretraining and its patch targets, the description LLM (corpus,
phrase tokenizer, packing), the shipped weights and their manifest, and the diagnostics that measure them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils.chat_template_utils import render_jinja_template

from fixtures.training import one_thread  # noqa: F401  (autouse: one torch thread)
from spatial_mllm.cli import main
from spatial_mllm.demo.encoders.copy_warmup import copy_batch
from spatial_mllm.demo.encoders.dense_vit import VitPretrainConfig, pretrain_vit, pretraining_scenes, render_pixels
from spatial_mllm.demo.encoders.description import describe_scene
from spatial_mllm.demo.encoders.description_llm import (
    DescriptionLlmConfig,
    build_corpus,
    build_drill_corpus,
    conversation_batches,
    corpus_batches,
    pretrain_description_llm,
    world_scenes,
)
from spatial_mllm.demo.encoders.patch_labels import BACKGROUND, centre_patch, dense_targets, label_map, patch_objects
from spatial_mllm.demo.encoders.phrase_tokenizer import train_phrase_tokenizer
from spatial_mllm.demo.encoders.scene_grid import cell_embeddings, cell_word_ids, place_cells
from spatial_mllm.demo.encoders.shipped import SHIPPED_DIR, read_manifest, shipped_encoder
from spatial_mllm.demo.world import make_world
from spatial_mllm.demo.world.render import SUPERSAMPLE
from spatial_mllm.demo.world.scene import COLORS, SHAPES, Scene, WorldConfig, WorldObject
from spatial_mllm.diagnostics.diagnose import diagnose_vision
from spatial_mllm.diagnostics.text_accuracy import greedy_answers, prompt_ids
from spatial_mllm.model.chat_templates import VICUNA_V1
from spatial_mllm.model.conversation import IGNORE_INDEX
from spatial_mllm.vision import VisionTower

TINY_VIT = dict(canvas=48, patch_size=12, width=32, layers=2, heads=2, head_layers=(1, 2), scenes=64, held_out=16,
                batch_size=16, warmup_steps=2)  # fmt: skip


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """A demo-style world large enough for probes: 200 train and 40 test images."""
    out = tmp_path_factory.mktemp("world")
    make_world(out, seed=3, n_train=200, n_val=4, n_test=40, n_holdout=4, progress=False, overwrite=True)
    return out


def two_object_scene() -> Scene:
    obj = lambda shape, color, size, x, y, r: WorldObject(shape, color, size, x, y, r, COLORS[color])  # noqa: E731
    return Scene("train_000000", "train", 96, 96, 40, 1,
                 (obj("square", "red", "large", 20, 30, 14), obj("circle", "blue", "small", 70, 75, 8)))  # fmt: skip


# --- what lies under each patch --------------------------------------------------------------------------------------
def test_patch_targets_name_the_object_under_each_patch():
    scene = two_object_scene()
    labels = label_map(scene)
    assert labels.shape == (96 * SUPERSAMPLE, 96 * SUPERSAMPLE)
    square = labels == 1
    # The square is drawn on exactly its box (x-r .. x+r-1, supersampled); nothing else is object 1.
    rows, cols = np.nonzero(square)
    assert (cols.min(), cols.max() + 1) == ((20 - 14) * SUPERSAMPLE, (20 + 14) * SUPERSAMPLE)
    assert (rows.min(), rows.max() + 1) == ((30 - 14) * SUPERSAMPLE, (30 + 14) * SUPERSAMPLE)
    owners = patch_objects(scene, 8)
    assert owners[centre_patch(20, 30, 96, 96, 8)] == 0 and owners[centre_patch(70, 75, 96, 96, 8)] == 1
    assert owners[0] == BACKGROUND and owners[7] == BACKGROUND  # top corners are empty
    targets = dense_targets([scene], 8)
    patch = centre_patch(70, 75, 96, 96, 8)
    assert targets.color[0, patch] == 1 + list(COLORS).index("blue")
    assert targets.shape[0, patch] == 1 + SHAPES.index("circle")
    assert targets.centre_x[0, patch] == pytest.approx(70 / 96) and targets.centre_y[0, patch] == pytest.approx(75 / 96)
    assert targets.color[0, 0] == 0 and targets.centre_x[0, 0] == -1


def test_description_lists_objects_left_to_right_on_a_tenths_grid():
    assert describe_scene(two_object_scene()) == (
        "There are two objects: a large red square at x 2 y 3; a small blue circle at x 7 y 7."
    )


# --- dense ViT pretraining -------------------------------------------------------------------------------------------
def test_dense_vit_pretraining_learns_and_saves_a_clip_folder(tmp_path):
    result = pretrain_vit(tmp_path / "vit", steps=150, lr=5e-3, **TINY_VIT)
    metrics = result.metrics
    assert metrics["final_loss"] < 0.4 * metrics["initial_loss"]
    # the tiny tower already tells colours apart per patch far above the 8-colour chance
    assert metrics["held_out_patch_color_accuracy"] > 0.7
    tower = VisionTower.from_pretrained(str(tmp_path / "vit"))
    assert tower.geometry.grid == 4 and tower.config.hidden_size == 32
    assert AutoImageProcessor.from_pretrained(tmp_path / "vit").crop_size["height"] == 48
    record = json.loads((tmp_path / "vit" / "pretraining.json").read_text())
    assert record["config"]["steps"] == 150 and record["config"]["world_seed"] == 1000
    assert [p.name for p in tmp_path.iterdir()] == ["vit"]  # written whole: no staging folder left


def test_dense_vit_pretraining_is_deterministic_by_seed(tmp_path):
    first = pretrain_vit(tmp_path / "a", steps=3, **TINY_VIT)
    again = pretrain_vit(tmp_path / "b", steps=3, **TINY_VIT)
    other = pretrain_vit(tmp_path / "c", steps=3, seed=1, **TINY_VIT)
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"] != weights["c"]
    assert first.metrics["final_loss"] == again.metrics["final_loss"] != other.metrics["final_loss"]


def test_pretraining_world_is_not_the_demo_world():
    config = VitPretrainConfig()
    pretraining = {scene.objects for scene in pretraining_scenes(config, 20)}
    demo = {scene.objects for scene in world_scenes(0, 20)}
    assert not pretraining & demo
    assert render_pixels(pretraining_scenes(config, 2)).shape == (2, 3, 96, 96)
    # the compositional hold-out stays held out: no pretraining scene shows a held-out colour + shape pair
    held = set(WorldConfig().holdout_color_shape)
    scenes = pretraining_scenes(config, 300) + world_scenes(config.world_seed, 300)
    assert not {(obj.color, obj.shape) for scene in scenes for obj in scene.objects} & held
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        VitPretrainConfig(canvas=100, patch_size=12)


# --- description LLM ---------------------------------------------------------------------------------------------
def test_phrase_tokenizer_keeps_world_words_whole_and_is_lossless(tmp_path):
    config = DescriptionLlmConfig(scenes=40)
    corpus = build_corpus(world_scenes(5, 40), config, 5)
    texts, _ = render_jinja_template(conversations=[item.messages for item in corpus], chat_template=VICUNA_V1,
                                     bos_token="<s>", eos_token="</s>")
    tokenizer = train_phrase_tokenizer(texts, tmp_path / "tok", vocab_size=600)
    text = "USER: Is there a red triangle? ASSISTANT: yes</s>"
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert "Ġred" in pieces and "Ġtriangle" in pieces and "ASSISTANT:" in pieces
    for sample in (text, "Größe 17 × ✓", texts[0]):
        assert tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"]) == sample
    assert tokenizer.convert_tokens_to_ids("<image>") != tokenizer.unk_token_id


def test_batches_keep_each_conversation_whole_in_its_own_row():
    encoded = [([n] * length, [n] * length) for n, length in enumerate((5, 4, 3, 6, 2, 3), start=1)]
    cells = [torch.full((4, 3), n) for n in range(1, 7)]
    batches = conversation_batches(encoded, 12, pad_id=0, cell_ids=cells, grid_side=2)
    rows = [[[token for token in row.tolist() if token] for row in batch.input_ids] for batch in batches]
    # by length: 2, 3, 3 | 4 (three rows of 4 would fit, but 5 is next: 2 x 5 = 10 fits) 5 | 6 (alone: 2 x 6 = 12)
    assert rows == [[[5] * 2, [3] * 3, [6] * 3], [[2] * 4, [1] * 5], [[4] * 6]]
    assert [tuple(batch.input_ids.shape) for batch in batches] == [(3, 3), (2, 5), (1, 6)]
    for batch in batches:
        input_ids, labels = batch.input_ids, batch.labels
        assert input_ids.numel() <= 12 and (labels[input_ids == 0] == IGNORE_INDEX).all()
        assert (labels[input_ids != 0] == input_ids[input_ids != 0]).all()
        # each row's cells travel with it
        assert batch.grid_side == 2 and (batch.cell_ids[:, 0, 0] == input_ids[:, 0]).all()


def test_copy_batches_repeat_or_reverse_their_first_half():
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        input_ids, labels = copy_batch(4, (3, 6), 0.5, 5, 50, 1, generator)
        k = (input_ids.shape[1] - 1) // 2
        assert input_ids.shape == (4, 2 * k + 1) and 3 <= k <= 6 and (input_ids[:, 0] == 1).all()
        first, second = input_ids[:, 1 : k + 1], input_ids[:, k + 1 :]
        assert ((first >= 5) & (first < 50)).all()
        reversed_copy = bool((second == first.flip(1)).all())
        assert reversed_copy or (second == first).all()
        seen.add(reversed_copy)
        assert (labels[:, : k + 2] == IGNORE_INDEX).all() and (labels[:, k + 2 :] == input_ids[:, k + 2 :]).all()
    assert seen == {True, False}
    with pytest.raises(ValueError, match="copy length must be"):
        copy_batch(4, (0, 6), 0.5, 5, 50, 1, generator)


# --- the scene as grid cells -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world_tokenizer():
    return AutoTokenizer.from_pretrained(SHIPPED_DIR / "llm")


def test_grid_cells_hold_the_words_of_the_object_under_each_patch(world_tokenizer):
    scene = two_object_scene()
    cells = cell_word_ids(scene, 8, world_tokenizer)
    assert cells.shape == (64, 3)
    words = lambda ids: [world_tokenizer.decode([i]) for i in ids.tolist()]  # noqa: E731
    assert words(cells[centre_patch(20, 30, 96, 96, 8)]) == [" large", " red", " square"]
    assert words(cells[centre_patch(70, 75, 96, 96, 8)]) == [" small", " blue", " circle"]
    background = (cells == world_tokenizer.convert_tokens_to_ids("<image>")).all(1)
    assert background.tolist() == (patch_objects(scene, 8) == BACKGROUND).tolist() and 0 < background.sum() < 60


def test_grid_cell_embeddings_average_the_words_then_pool_2x2():
    embedding = torch.nn.Embedding(20, 4)
    ids = torch.randint(0, 20, (2, 64, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, pooled = cell_embeddings(embedding, ids, 8), cell_embeddings(embedding, ids, 4)
        assert full.shape == (2, 64, 4) and pooled.shape == (2, 16, 4)
        torch.testing.assert_close(full[1, 5], embedding(ids[1, 5]).mean(0))
        for row in range(2):  # each pooled cell: the mean of the 4 cells x 3 words under it
            for r in range(4):
                for c in range(4):
                    under = torch.stack([ids[row, (2 * r + dr) * 8 + 2 * c + dc] for dr in (0, 1) for dc in (0, 1)])
                    torch.testing.assert_close(pooled[row, r * 4 + c], embedding(under).mean((0, 1)))
    with pytest.raises(ValueError, match="cannot pool a grid of 64 cells to 3x3"):
        cell_embeddings(embedding, ids, 3)


def test_place_cells_fills_each_rows_image_positions_in_order():
    ids = torch.tensor([[1, 9, 9, 2], [9, 9, 3, 4]])
    cells = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])
    placed = place_cells(torch.zeros(2, 4, 1), ids, 9, cells)
    assert placed[..., 0].tolist() == [[0, 1, 2, 0], [3, 4, 0, 0]]
    with pytest.raises(ValueError, match="4 <image> positions for 2 x 1 grid cells"):
        place_cells(torch.zeros(2, 4, 1), ids, 9, cells[:, :1])


def test_grid_corpus_shows_some_scenes_as_cells_in_place_of_their_description(world_tokenizer):
    scenes = world_scenes(5, 80)
    plain = [item.messages for item in build_corpus(scenes, DescriptionLlmConfig(), 5)]
    config = DescriptionLlmConfig(grid_fraction=0.5)
    corpus = build_corpus(scenes, config, 5)
    grids = [item for item in corpus if item.grid_side]
    assert 20 <= len(grids) <= 60 and {item.grid_side for item in grids} == {8, 4}
    for item in grids:
        first = item.messages[0]["content"]
        assert first.startswith("<image>\n") and "object" not in first.split("\n")[0]
    texts = [item.messages for item in corpus if not item.grid_side]
    assert texts and all(messages in plain for messages in texts)  # the text conversations are the plain ones
    batches = corpus_batches(corpus, world_tokenizer, config)
    image = world_tokenizer.convert_tokens_to_ids("<image>")
    rows = {0: 0, 8: 0, 4: 0}
    batched_cells = []
    for batch in batches:
        assert ((batch.input_ids == image).sum(1) == batch.grid_side**2).all()  # text rows hold none
        rows[batch.grid_side] += len(batch.input_ids)
        if batch.grid_side:
            assert batch.cell_ids.shape == (len(batch.input_ids), 64, 3)
            batched_cells += [tuple(cells.flatten().tolist()) for cells in batch.cell_ids]
    assert rows == {side: sum(item.grid_side == side for item in corpus) for side in (0, 8, 4)}
    expected = [tuple(cell_word_ids(item.grid_scene, 8, world_tokenizer).flatten().tolist()) for item in grids]
    assert sorted(batched_cells) == sorted(expected)
    for sides in ((8, 3), (8, 8), (8, 0), ()):
        with pytest.raises(ValueError, match="grid_sides must be distinct positive sides"):
            DescriptionLlmConfig(grid_sides=sides)


def test_drill_corpus_asks_one_category_per_conversation_about_other_objects_each_turn():
    scenes = world_scenes(5, 60)
    config = DescriptionLlmConfig(drill_categories=("closer", "count"), grid_fraction=0.5)
    drill = build_drill_corpus(scenes, config, 5)
    assert 45 <= len(drill) <= 60 and {item.grid_side for item in drill} == {0, 8, 4}
    asked, varied = {"closer": 0, "count": 0}, 0
    for item in drill:
        asks = [m["content"].split("\n")[1 if k == 0 else 0 :] for k, m in enumerate(item.messages[::2])]
        questions = [lines[0] for lines in asks]
        answers = [m["content"] for m in item.messages[1::2]]
        assert 1 <= len(questions) <= config.turns[1]
        category = "closer" if questions[0].startswith("Which is closer") else "count"
        assert all(q.startswith("Which is closer" if category == "closer" else "How many") for q in questions)
        asked[category] += 1
        varied += len(set(questions)) > 1  # each turn draws its question afresh
        if category == "closer":
            for question, lines, answer in zip(questions, asks, answers):
                if len(lines) == 2:  # a short answer (no options) names one of the two objects asked
                    assert f"the {answer} or" in question or f"or the {answer}?" in question
        first = item.messages[0]["content"].split("\n")[0]
        assert first == "<image>" if item.grid_side else first.startswith("There are")
    assert asked["closer"] >= 20 and asked["count"] >= 20
    assert varied >= 0.8 * len(drill)
    with pytest.raises(ValueError, match=r"drill_categories \['nearest'\] are not categories of the world"):
        DescriptionLlmConfig(drill_categories=("nearest",))
    with pytest.raises(ValueError, match="drill_fraction in"):
        DescriptionLlmConfig(drill_fraction=0)


def test_greedy_answers_read_image_embeddings_as_the_tokens_they_embed(world_tokenizer):
    config = LlamaConfig(vocab_size=len(world_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=world_tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    questions = ("Is there a red circle?", "What shape is the small blue object in the image?")
    words = world_tokenizer(" large red square blue", add_special_tokens=False)["input_ids"]
    with_cells = [prompt_ids(world_tokenizer, f"<image>\n{q}", image_tokens=len(words)) for q in questions]
    spelled = [prompt_ids(world_tokenizer, f" large red square blue\n{q}") for q in questions]
    cells = [model.get_input_embeddings()(torch.tensor(words)).detach()] * 2
    from_cells = greedy_answers(model, world_tokenizer, with_cells, image_embeds=cells, max_new_tokens=6)
    assert from_cells == greedy_answers(model, world_tokenizer, spelled, max_new_tokens=6)
    assert all(from_cells)  # six tokens each, not an empty decode
    with pytest.raises(ValueError, match="1 image embeddings for 2 prompts"):
        greedy_answers(model, world_tokenizer, with_cells, image_embeds=cells[:1])


def test_description_llm_pretraining_saves_model_and_tokenizer(tmp_path):
    notes = []
    result = pretrain_description_llm(tmp_path / "llm", steps=60, warmup_steps=2, scenes=150, held_out_scenes=4,
                                      batch_tokens=2048, copy_steps=5, copy_rows=8, hidden=32, intermediate=64,
                                      heads=2, kv_heads=1, vocab_size=700, lr=1e-2, grid_fraction=0.3,
                                      drill_categories=("closer",), drill_steps=10, log=notes.append)
    steps = [note for note in notes if note.startswith("llm step ")]  # every third of 5 + 60 steps
    assert steps[0].startswith("llm step 3/65") and steps[0].endswith("(copy warm-up)")  # the first 5 copy
    assert steps[-1].startswith("llm step 63/65") and "copy" not in steps[-1]
    assert any("(grid 8x8)" in note for note in steps) or any("(grid 4x4)" in note for note in steps)
    drilled = [note for note in notes if note.startswith("llm drill step ")]  # its own schedule, after the corpus
    assert drilled[0].startswith("llm drill step 1/10") and drilled[-1].startswith("llm drill step 10/10")
    assert notes.index(drilled[0]) > notes.index(steps[-1])
    assert result.metrics["final_loss"] < 0.7 * result.metrics["initial_loss"]
    for view in ("with_description", "without_description", "with_grid8", "with_grid4"):
        assert 0 <= result.metrics[f"held_out_accuracy_{view}"] <= 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llm")
    assert model.config.vocab_size == len(tokenizer) and model.config.hidden_size == 32
    assert "ASSISTANT:" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                         add_generation_prompt=True)


# --- shipped weights ---------------------------------------------------------------------------------------------
def test_shipped_manifest_records_how_each_encoder_was_made():
    manifest = read_manifest()
    vit = manifest["vit"]
    assert vit["command"].startswith("spatial-mllm world-encoders vit") and vit["environment"]["threads"] == 1
    assert vit["config"]["world_seed"] == 1000 and vit["config"]["steps"] >= 1000
    assert vit["metrics"]["held_out_patch_shape_accuracy"] > 0.95
    llm = manifest["llm"]
    assert llm["command"] == f"spatial-mllm world-encoders llm --out OUT --threads {llm['environment']['threads']}"
    assert llm["config"]["copy_steps"] > 0 and llm["config"]["world_seed"] == 1000
    assert llm["metrics"]["held_out_accuracy_with_description"] > 0.6  # the copy warm-up's doing (without: 0.50)
    # it reads the scene from grid cells too, nearly as well as from the description (measured: 81.6% / 83.0%)
    assert llm["config"]["grid_fraction"] > 0 and llm["metrics"]["held_out_accuracy_with_grid8"] > 0.7
    assert llm["config"]["drill_steps"] > 0 and llm["config"]["drill_categories"] == ["closer"]
    # the drill lifts "which is closer" (two options) off the coin's rate (measured: 67%; 47% before any drill)
    assert llm["metrics"]["held_out_with_description_closer"] > 0.6
    assert llm["diagnostics"]["binding"]["shape"]["right"] > llm["diagnostics"]["binding"]["shape"]["scene_guess_rate"]
    # `spatial-mllm world-encoders vit|llm` with its defaults remakes what ships (JSON keeps tuples as lists)
    for found, config_class in ((vit, VitPretrainConfig), (llm, DescriptionLlmConfig)):
        assert found["config"] == json.loads(json.dumps(dataclasses.asdict(config_class())))
    total = sum((SHIPPED_DIR / name / file).stat().st_size for name in manifest for file in manifest[name]["files"])
    assert total < 10 * 2**20  # a few MB


def test_shipped_files_are_checked_against_the_manifest(tmp_path):
    root = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DIR, root)
    assert shipped_encoder("vit", root) == root / "vit"
    weights = root / "vit" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match its sha256"):
        shipped_encoder("vit", root)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        shipped_encoder("vit", root)
    with pytest.raises(ValueError, match="no shipped encoder 'clip'"):
        shipped_encoder("clip", root)


def test_shipped_vit_says_shape_per_patch(small_world):
    """The shipped tower on a world it never saw: each object's shape from the one patch under its centre."""
    found = diagnose_vision(shipped_encoder("vit"), small_world, fit_images=200, score_images=40)
    assert found["images"] == {"train": 200, "test": 40}
    assert set(found["layers"]) == {2, 3, 4}  # what saep (2, 3), mlp2x_gelu / LLaVA-SP (3) and c_abstractor (4) read
    assert found["read_by"]["mlp2x_gelu"] == [3] and found["read_by"]["saep"] == [2, 3]
    for layer in (2, 3):
        assert found["layers"][layer]["shape"] > 0.9 > found["majority"]["shape"] + 0.5
        assert found["layers"][layer]["color"] > 0.95


def test_probe_of_a_random_tower_stays_near_chance_on_shape(small_world, tmp_path):
    """The control for the probe itself: an untrained tower's patches do not give shape away."""
    pretrain_vit(tmp_path / "untrained", steps=1, lr=1e-9, canvas=96, scenes=8, held_out=8, batch_size=4)
    found = diagnose_vision(tmp_path / "untrained", small_world, layers=(3,), fit_images=200, score_images=40)
    assert found["layers"][3]["shape"] < 0.6


# --- commands --------------------------------------------------------------------------------------------------------
def test_diagnose_command_prints_probes_and_writes_json(small_world, tmp_path, capsys):
    out = tmp_path / "diagnosis.json"
    args = ["diagnose", "--world", str(small_world), "--vision", str(shipped_encoder("vit")), "--layers", "3",
            "--fit-images", "100", "--images", "20", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mlp2x_gelu" in printed and "majority" in printed
    written = json.loads(out.read_text())
    assert list(written["vision"]["layers"]) == ["3"] and written["vision"]["images"] == {"train": 100, "test": 20}
    assert main(args) == 2  # the output exists: refused without --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["diagnose", "--world", str(small_world)]) == 2
    assert "give --vision, --llm or both" in capsys.readouterr().err
    assert main(["diagnose", "--world", str(tmp_path / "nowhere"), "--vision", "x"]) == 2
    assert "world folder not found" in capsys.readouterr().err
    assert main(["diagnose", "--world", str(small_world), "--llm", str(tmp_path)]) == 2
    assert "no config.json, not a causal LM folder" in capsys.readouterr().err
    vit = str(shipped_encoder("vit"))
    assert main(["diagnose", "--world", str(small_world), "--vision", vit, "--layers", "9"]) == 2
    assert "layers [9] do not exist" in capsys.readouterr().err


def test_world_encoders_command_checks_its_settings(tmp_path, capsys):
    assert main(["world-encoders", "vit", "--out", str(tmp_path / "v"), "--set", "colour=3"]) == 2
    assert "FIELD one of" in capsys.readouterr().err
    assert main(["world-encoders", "vit", "--out", str(tmp_path / "v"), "--set", "steps=three"]) == 2
    assert "is not a JSON value" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    assert main(["world-encoders", "vit", "--out", str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    settings = ["canvas=48", "width=32", "layers=2", "heads=2", "head_layers=[1,2]", "scenes=16", "held_out=8",
                "steps=2", "batch_size=4"]
    assert main(["world-encoders", "vit", "--out", str(tmp_path / "v"), "--set", *settings]) == 0
    assert json.loads((tmp_path / "v" / "pretraining.json").read_text())["config"]["head_layers"] == [1, 2]


def test_rendered_world_images_are_what_the_probe_reads(small_world):
    """The probe reads the world's PNGs; the pretraining renders in memory: the same pixels."""
    from spatial_mllm.diagnostics.probe import read_scenes

    scene = read_scenes(small_world, "test", 1)[0]
    with Image.open(small_world / scene.image) as image:
        on_disk = np.asarray(image.convert("RGB"))
    assert np.array_equal(render_pixels([scene])[0].permute(1, 2, 0).numpy(), on_disk)
