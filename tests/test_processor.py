"""The processor as the one path to model inputs: a folder saved by training carries its template, and a plain
`AutoProcessor.from_pretrained` of it prompts exactly as training tokenised; folders saved before the processor
carried its template still load with the template their run recorded."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from fixtures.llava_data import GOOD_RECORDS, MIXED, world_tokenizer, write_mixed_dataset
from fixtures.training import one_thread  # noqa: F401  (autouse: one torch thread)
from spatial_mllm.data.dataset import LlavaDataset
from spatial_mllm.model import IGNORE_INDEX, RUN_INFO_FILE, SpatialMLLMProcessor, build_model
from spatial_mllm.model.chat_templates import CHAT_TEMPLATES
from spatial_mllm.training.config import TrainConfig, apply_override
from spatial_mllm.training.engine import train
from tiny import tiny_clip, tiny_llama

# A tokenizer's own template unlike vicuna_v1 (plain-text role markers, so the byte-level tokenizer needs no new
# tokens), to tell "the tokenizer's template" apart from ours.
ROLE_MARKERS = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model whose tokenizer (trained on the mixed file's text) has its own chat template, saved."""
    folder = tmp_path_factory.mktemp("base")
    tokenizer = world_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    tokenizer.chat_template = ROLE_MARKERS
    torch.manual_seed(0)
    model, processor = build_model(tiny_clip(), tiny_llama(vocab_size=len(tokenizer)), tokenizer, "mlp2x_gelu")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    json_path, folder = write_mixed_dataset(root)
    records = json.loads(MIXED.read_text())
    clean = root / "clean.json"
    clean.write_text(json.dumps([records[i] for i in GOOD_RECORDS[:1]]))  # one image record, a single exchange
    return clean, folder


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "chat_template"])
def test_trained_folder_prompts_as_training_tokenised(base, data, tmp_path, template):
    json_path, folder = data
    out = tmp_path / "run"
    config = TrainConfig()
    stage = "align" if template == "plain" else "instruct"
    for setting in (
        f"stage.name={stage}", f"stage.init_from={base}", f"output_dir={out}", f"data.train_json={json_path}",
        f"data.image_folder={folder}", f"data.template={template}", "optimisation.max_steps=1",
        "optimisation.global_batch_size=1", "optimisation.micro_batch_size=1",
    ):
        apply_override(config, setting)
    train(config)

    loaded = AutoProcessor.from_pretrained(out)
    assert isinstance(loaded, SpatialMLLMProcessor)
    expected_template = ROLE_MARKERS if template == "chat_template" else CHAT_TEMPLATES[template]
    assert loaded.chat_template == expected_template and (out / "chat_template.jinja").is_file()

    # What training tokenised: the base processor switched to the run's template, as the engine does.
    training_processor = SpatialMLLMProcessor.from_pretrained(base)
    training_processor.use_template(template)
    item = LlavaDataset(json_path, folder, training_processor)[0]
    record = LlavaDataset(json_path, folder, training_processor).record(0)

    prompt = loaded.apply_chat_template(list(record.messages[:-1]), add_generation_prompt=True)
    with Image.open(folder / record.images[0]) as image:
        inputs = loaded(images=[image.convert("RGB")], text=prompt)
    prompt_ids = inputs["input_ids"][0].tolist()
    training_ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert training_ids[: len(prompt_ids)] == prompt_ids
    first_supervised = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert first_supervised == len(prompt_ids)  # the prompt is everything before the reply
    assert torch.equal(inputs["pixel_values"], item["pixel_values"])


@pytest.mark.parametrize("recorded", ["plain", "vicuna_v1"])
def test_folder_saved_before_processors_carried_templates_still_loads(base, tmp_path, recorded):
    folder = tmp_path / "old"
    processor = SpatialMLLMProcessor.from_pretrained(base)
    processor.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink()  # how folders were saved then: the template lived in the run info
    (folder / RUN_INFO_FILE).write_text(json.dumps({"template": recorded, "model_id": "old", "stage": "instruct"}))
    loaded = AutoProcessor.from_pretrained(folder)
    assert loaded.template == recorded and loaded.chat_template == CHAT_TEMPLATES[recorded]
    (folder / RUN_INFO_FILE).unlink()
    # Neither a saved template nor a recorded one (the processor saves the template, not its tokenizer): the
    # processor's default, vicuna_v1.
    assert AutoProcessor.from_pretrained(folder).chat_template == CHAT_TEMPLATES["vicuna_v1"]
