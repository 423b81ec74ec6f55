"""Official LLaVA-1.5 / LLaVA-SP releases, end to end: `spatial-mllm import-llava` and `export-llava`.

Each release kind is written in miniature (fixtures/llava_releases.py) and checked against a reference computed
here, independently of the importer and of our model classes, the way LLaVA's own code runs it: the LLM from the
release's Llama fields with the LoRA merged by hand (W + B @ A * alpha / r), the projector from the spec with plain
torch ops, the image padded by `expand2square` with `int(255 * mean)`, the prompt tokenised around `<image>` chunk
by chunk with sentencepiece itself.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from fixtures.llava_releases import SFE_SIZES, VICUNA_SYSTEM, Releases, make_releases
from spatial_mllm import cli
from spatial_mllm.model import SpatialMLLMForConditionalGeneration, SpatialMLLMProcessor
from spatial_mllm.model.loading import load_model_folder

KINDS = ("llava_sp_pooling", "llava_sp_cropping", "llava_lora", "llava_full")
PROJECTOR_OF = {"llava_sp_pooling": "llava_sp_pooling", "llava_sp_cropping": "llava_sp_cropping",
                "llava_lora": "mlp2x_gelu", "llava_full": "mlp2x_gelu"}  # fmt: skip
IMAGE_MARKER = -200  # LLaVA's IMAGE_TOKEN_INDEX, where tokenizer_image_token puts the image
QUESTION = "What is to the left of the red circle?"
MAX_NEW_TOKENS = 6


@pytest.fixture(autouse=True)
def only_these_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("spatial_mllm.weights.commands", "spatial_mllm.evaluation.commands"))


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> Releases:
    return make_releases(tmp_path_factory.mktemp("releases"))


def import_args(releases: Releases, kind: str, out: Path, *extra: str) -> list[str]:
    args = ["import-llava", "--model-path", str(releases.folder(kind)), "--out", str(out), *extra]
    if kind != "llava_full":  # LoRA releases name a CLIP path of their author's machine, or a hub name
        args += ["--model-base", str(releases.base), "--vision-tower", str(releases.clip)]
    return args


@pytest.fixture(scope="module")
def imported(releases, tmp_path_factory) -> dict[str, Path]:
    """Each release imported in float32 through the command line, as a user would."""
    root = tmp_path_factory.mktemp("imported")
    folders = {}
    for kind in KINDS:
        assert cli.main(import_args(releases, kind, root / kind, "--dtype", "float32")) == 0
        folders[kind] = root / kind
    return folders


# --- the reference: LLaVA's computation, from the release files ---------------------------------------------------------


def load_shards(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    state = {}
    for shard in sorted(set(index.values())):
        state.update(torch.load(folder / shard, weights_only=True))
    return {k: v.double() for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def load_adapter(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter_model.safetensors").is_file():
        return load_file(folder / "adapter_model.safetensors")
    return torch.load(folder / "adapter_model.bin", weights_only=True)


class Reference:
    """LLaVA's model, built here from the release files, computed in float64 (so that the imported model, in
    float32, differs from it by its own rounding only: about 1e-5 in these logits)."""

    def __init__(self, releases: Releases, kind: str):
        folder = releases.folder(kind)
        config = json.loads((folder / "config.json").read_text())
        if kind == "llava_full":
            state = load_shards(folder)
            self.projector = {k: state.pop(k) for k in [k for k in state if k.startswith("model.mm_projector")]}
        else:
            state = load_shards(releases.base)
            adapter = {k: v.double() for k, v in load_adapter(folder).items()}
            lora = json.loads((folder / "adapter_config.json").read_text())
            scale = lora["lora_alpha"] / lora["r"]
            for key in [k for k in adapter if ".lora_A." in k]:
                module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                down, up = adapter[key], adapter[key.replace(".lora_A.", ".lora_B.")]
                state[f"{module}.weight"] = state[f"{module}.weight"] + (up @ down) * scale
            trainables = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
            self.projector = {k.removeprefix("base_model.model."): v.double() for k, v in trainables.items()}
        fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "rms_norm_eps", "vocab_size", "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id")
        llama_config = LlamaConfig(**{k: config[k] for k in fields}, rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]})
        self.llm = LlamaForCausalLM(llama_config).double().eval()
        self.llm.load_state_dict(state, strict=True)
        self.clip = CLIPVisionModel.from_pretrained(releases.clip).double().eval()
        self.image_processor = CLIPImageProcessor.from_pretrained(releases.clip)
        self.sp = spm.SentencePieceProcessor(model_file=str(releases.tokenizer))
        self.eos = config["eos_token_id"]

    # LLaVA's expand2square + the CLIP image processor
    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        fill = tuple(int(x * 255) for x in self.image_processor.image_mean)
        width, height = image.size
        side = max(width, height)
        canvas = Image.new(image.mode, (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return self.image_processor.preprocess(canvas, return_tensors="pt")["pixel_values"]

    # tokenizer_image_token with the slow Llama tokenizer: each chunk on its own, BOS only at the very start
    def input_ids(self, prompt: str) -> list[int]:
        ids = [self.sp.bos_id()]
        for index, chunk in enumerate(prompt.split("<image>")):
            ids += ([IMAGE_MARKER] if index else []) + self.sp.encode(chunk)
        return ids

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """spec section 1 and 2, from the official tensors"""
        p = self.projector
        out = F.linear(F.gelu(F.linear(patches, p["model.mm_projector.0.weight"], p["model.mm_projector.0.bias"])),
                       p["model.mm_projector.2.weight"], p["model.mm_projector.2.bias"])
        if "model.conv_24.weight" not in p:
            return out
        batch, n, width = patches.shape
        grid = math.isqrt(n)
        fmap = patches.transpose(1, 2).reshape(batch, width, grid, grid)
        pooling = "model.conv_4.1.weight" in p
        tokens = []
        for size in SFE_SIZES:
            if pooling:
                region = F.adaptive_avg_pool2d(fmap, size)
                weight = p[f"model.conv_{size}.1.weight"] if size != grid else p["model.conv_24.weight"]
            else:
                start = (grid - size) // 2
                region = fmap[:, :, start : start + size, start : start + size]
                weight = p[f"model.conv_{size}.weight"]
            tokens.append(F.conv2d(region, weight).flatten(1))
        spatial = torch.stack(tokens, dim=1)  # (B, 6, S), smallest region first
        detail = F.conv2d(fmap, p["model.conv_CM.weight"], stride=2).flatten(2).transpose(1, 2)  # (B, 25, S)

        def norm_linear(role: str, x: torch.Tensor) -> torch.Tensor:
            x = F.layer_norm(x, x.shape[-1:], p[f"model.{role}_projector.0.weight"], p[f"model.{role}_projector.0.bias"])
            return F.linear(x, p[f"model.{role}_projector.1.weight"], p[f"model.{role}_projector.1.bias"])

        q, k, v = norm_linear("query", spatial), norm_linear("key", detail), norm_linear("value", detail)
        attended = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        fused = torch.cat([spatial, attended], dim=-1)
        spatial_tokens = F.linear(F.gelu(fused), p["model.conv_linear.1.weight"], p.get("model.conv_linear.1.bias"))
        return torch.cat([spatial_tokens, out], dim=1)  # spatial tokens first

    @torch.no_grad()
    def logits(self, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.clip(pixel_values.double(), output_hidden_states=True).hidden_states[-2][:, 1:]
        image = self.project(patches)[0]
        at = ids.index(IMAGE_MARKER)
        embed = self.llm.get_input_embeddings()
        pieces = [embed(torch.tensor(ids[:at])), image, embed(torch.tensor(ids[at + 1 :]))]
        return self.llm(inputs_embeds=torch.cat(pieces)[None]).logits[0]

    def greedy_answer(self, prompt: str, image: Image.Image) -> str:
        ids, pixels, answer = self.input_ids(prompt), self.pixel_values(image), []
        for _ in range(MAX_NEW_TOKENS):
            token = int(self.logits(ids + answer, pixels)[-1].argmax())
            if token == self.eos:
                break
            answer.append(token)
        return self.sp.decode(answer).strip()


def vicuna_prompt(question: str) -> str:
    """conv_vicuna_v1.get_prompt() for one user turn with an image, as LLaVA's eval scripts build it."""
    return f"{VICUNA_SYSTEM} USER: <image>\n{question} ASSISTANT:"


def expand(ids: list[int], image_token_id: int, count: int) -> list[int]:
    return [x for i in ids for x in ([image_token_id] * count if i == IMAGE_MARKER else [i])]


def wide_image() -> Image.Image:
    """Non-square, so LLaVA's padding colour enters the pixels."""
    image = Image.new("RGB", (40, 22), (200, 30, 30))
    image.paste((20, 40, 220), (4, 4, 16, 18))
    return image


@pytest.fixture(scope="module")
def references(releases) -> dict[str, Reference]:
    return {kind: Reference(releases, kind) for kind in KINDS}


# --- what it must show ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_imported_logits_equal_llava_reference(imported, references, kind):
    reference = references[kind]
    model = SpatialMLLMForConditionalGeneration.from_pretrained(imported[kind]).eval()  # float32, as imported
    assert model.config.projector_type == PROJECTOR_OF[kind]
    ids = reference.input_ids(vicuna_prompt(QUESTION))
    pixels = reference.pixel_values(wide_image())
    want = reference.logits(ids, pixels)
    ours = torch.tensor([expand(ids, model.config.image_token_id, model.num_image_tokens)])
    with torch.no_grad():
        got = model(input_ids=ours, pixel_values=pixels).logits[0]
    assert got.shape == want.shape == (len(ours[0]), 400)
    assert (got - want).abs().max() < 1e-4
    assert want.std() > 0.5  # a model whose logits vary, so agreement is not a coincidence of flat outputs


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_tokens_equal_llava_separate_tokenisation(imported, references, kind):
    processor = SpatialMLLMProcessor.from_pretrained(imported[kind])
    assert processor.template == "vicuna_v1"
    messages = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == vicuna_prompt(QUESTION)
    want = expand(references[kind].input_ids(prompt), processor.image_token_id, processor.num_image_tokens)
    # one-pass tokenisation differs here: after "<image>" sentencepiece starts a new chunk with "▁"
    assert want[want.index(processor.image_token_id) + processor.num_image_tokens] == references[kind].sp.piece_to_id("▁")
    got = processor(images=wide_image(), text=prompt)["input_ids"][0].tolist()
    assert got == want


@pytest.mark.parametrize("kind", KINDS)
def test_non_square_image_is_padded_with_llava_colour(imported, references, kind):
    processor = SpatialMLLMProcessor.from_pretrained(imported[kind])
    image = wide_image()
    want = references[kind].pixel_values(image)
    got = processor(images=image, text="<image>")["pixel_values"]
    assert torch.equal(got, want)
    # the top rows are padding: (int(255 * mean) / 255 - mean) / std, which rounding would miss by up to 1/255
    mean, std = torch.tensor(processor.image_processor.image_mean), torch.tensor(processor.image_processor.image_std)
    fill = (torch.tensor([int(255 * m) for m in mean.tolist()]) / 255 - mean) / std
    assert torch.allclose(got[0, :, 0, :], fill[:, None].expand(3, got.shape[-1]), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_gives_the_reference_greedy_answer(imported, references, kind, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    wide_image().save(images / "wide.png")
    tall = wide_image().transpose(Image.Transpose.ROTATE_90)
    tall.save(images / "tall.png")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        json.dumps({"question_id": 1, "image": "wide.png", "text": QUESTION}) + "\n"
        + json.dumps({"question_id": 2, "image": "tall.png", "text": "How many shapes are there?"}) + "\n"
    )
    out = tmp_path / "answers.jsonl"
    assert cli.main(["eval", "--model", str(imported[kind]), "--questions", str(questions), "--images", str(images),
                     "--out", str(out), "--max-new-tokens", str(MAX_NEW_TOKENS), "--quiet"]) == 0  # fmt: skip
    answers = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    want = [
        references[kind].greedy_answer(vicuna_prompt(QUESTION), wide_image()),
        references[kind].greedy_answer(vicuna_prompt("How many shapes are there?"), tall),
    ]
    assert all(want) and answers == want


def test_lmms_eval_model_gives_the_reference_greedy_answer(imported, references):
    from types import SimpleNamespace

    from spatial_mllm.evaluation.lmms_eval_model import SpatialMLLMLmms

    lm = SpatialMLLMLmms(pretrained=str(imported["llava_sp_cropping"]), device="cpu", batch_size=1)
    lm.task_dict = {"task": {"test": [{"question": QUESTION, "image": wide_image()}]}}
    request = SimpleNamespace(args=(QUESTION, {"max_new_tokens": MAX_NEW_TOKENS}, lambda doc: [doc["image"]], 0,
                                    "task", "test"))  # fmt: skip
    want = references["llava_sp_cropping"].greedy_answer(vicuna_prompt(QUESTION), wide_image())
    assert want and lm.generate_until([request]) == [want]


def test_chat_answers_with_the_reference_greedy_answer(imported, references, tmp_path):
    from spatial_mllm.model.loading import load_for_inference
    from spatial_mllm.serving.chat import ChatSession

    session = ChatSession(*load_for_inference(imported["llava_lora"]), max_new_tokens=MAX_NEW_TOKENS)
    wide_image().save(tmp_path / "wide.png")
    session.attach(tmp_path / "wide.png")
    want = references["llava_lora"].greedy_answer(vicuna_prompt(QUESTION), wide_image())
    assert want and session.reply(QUESTION) == want


def test_serve_answers_with_the_reference_greedy_answer(imported, references):
    import io

    import openai
    from fixtures.serving import data_url, live_server

    from spatial_mllm.model.loading import load_for_inference
    from spatial_mllm.serving.app import create_app
    from spatial_mllm.serving.settings import ServerSettings

    model, processor = load_for_inference(imported["llava_sp_pooling"])
    png = io.BytesIO()
    wide_image().save(png, format="PNG")
    with live_server(create_app(model, processor, ServerSettings(served_model_name="llava-sp-pooling"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="llava-sp-pooling", max_tokens=MAX_NEW_TOKENS, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png.getvalue())}},
                                                   {"type": "text", "text": QUESTION}]}],
        )  # fmt: skip
    want = references["llava_sp_pooling"].greedy_answer(vicuna_prompt(QUESTION), wide_image())
    assert want and reply.choices[0].message.content.strip() == want


def assert_refused(capsys, code: int, out: Path, *words: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    message = err.strip().splitlines()[-1]  # (after any "Loading weights" progress bar)
    assert "Traceback" not in err and message.startswith("spatial-mllm import-llava: error: "), err
    for word in words:
        assert word in message, (word, message)
    assert not out.exists() and not any(out.parent.glob(f".tmp-{out.name}*"))
    return err


@pytest.mark.parametrize(
    "kind, asked",
    [("llava_sp_pooling", "llava_sp_cropping"), ("llava_sp_cropping", "llava_sp_pooling"),
     ("llava_lora", "llava_sp_pooling"), ("llava_sp_pooling", "llava_sp_pooling_nodfi")],
)  # fmt: skip
def test_a_release_of_another_variant_is_refused(releases, kind, asked, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(import_args(releases, kind, out, "--projector", asked))
    assert_refused(capsys, code, out, PROJECTOR_OF[kind], asked)


def test_an_sp_release_missing_its_detail_integrator_is_refused(releases, tmp_path, capsys):
    """An intermediate LLaVA-SP checkpoint (DFI frozen, so not saved) must not load with those weights left random."""
    release = tmp_path / "release"
    shutil.copytree(releases.pooling, release)
    trainables = torch.load(release / "non_lora_trainables.bin", weights_only=True)
    dfi = ("conv_CM", "query_projector", "key_projector", "value_projector")
    torch.save({k: v for k, v in trainables.items() if not any(name in k for name in dfi)},
               release / "non_lora_trainables.bin")
    out = tmp_path / "out"
    code = cli.main(["import-llava", "--model-path", str(release), "--model-base", str(releases.base),
                     "--vision-tower", str(releases.clip), "--out", str(out)])  # fmt: skip
    assert_refused(capsys, code, out, "model.conv_linear.1.weight", "DFI weights", "missing")


def test_an_unresolvable_vision_tower_names_the_usual_one(releases, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["import-llava", "--model-path", str(releases.pooling), "--model-base", str(releases.base),
                     "--out", str(out)])  # fmt: skip
    assert_refused(capsys, code, out, "/home/author/ckpt/clip-vit-large-patch14-336", "resolves to nothing here",
                   "--vision-tower", "openai/clip-vit-large-patch14-336")


def test_a_vision_tower_of_another_grid_is_refused(releases, tmp_path, capsys):
    from fixtures.llava_releases import make_clip

    small = make_clip(tmp_path / "clip-224", image_size=24)  # a 12x12 grid, as CLIP-L/14 at 224 px is 16x16
    out = tmp_path / "out"
    code = cli.main(["import-llava", "--model-path", str(releases.cropping), "--model-base", str(releases.base),
                     "--vision-tower", str(small), "--out", str(out)])  # fmt: skip
    assert_refused(capsys, code, out, "24x24", "12x12", "openai/clip-vit-large-patch14-336")


def test_a_lora_release_needs_its_base(releases, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["import-llava", "--model-path", str(releases.llava_lora), "--vision-tower", str(releases.clip),
                     "--out", str(out)])  # fmt: skip
    assert_refused(capsys, code, out, "LoRA release", "--model-base", "lmsys/vicuna-7b-v1.5")
    code = cli.main(["import-llava", "--model-path", str(releases.llava_full), "--keep-lora", "--out", str(out)])
    assert_refused(capsys, code, out, "--keep-lora", "full release")


def test_an_existing_out_is_replaced_only_when_asked(releases, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = cli.main(import_args(releases, "llava_full", out))
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and "--overwrite" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert cli.main(import_args(releases, "llava_full", out, "--overwrite")) == 0
    assert not (out / "notes.txt").exists() and load_model_folder(out)[0].config.projector_type == "mlp2x_gelu"
    # an output that is an input is refused, --overwrite or not
    code = cli.main(import_args(releases, "llava_full", releases.llava_full, "--overwrite"))
    assert code == 2 and "is also the input --model-path" in capsys.readouterr().err
    assert (releases.llava_full / "pytorch_model.bin.index.json").is_file()


def test_an_unreachable_hub_vision_tower_is_named_at_once(releases, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    out = tmp_path / "out"
    code = cli.main(["import-llava", "--model-path", str(releases.llava_lora), "--model-base", str(releases.base),
                     "--out", str(out)])  # fmt: skip
    assert_refused(capsys, code, out, "mm_vision_tower", "openai/clip-vit-large-patch14-336", "cannot be reached",
                   "--vision-tower")


def test_a_missing_sentencepiece_is_named(releases, tmp_path, capsys, monkeypatch):
    from spatial_mllm.weights import llava_import

    monkeypatch.setattr(llava_import, "is_sentencepiece_available", lambda: False)
    out = tmp_path / "out"
    code = cli.main(import_args(releases, "llava_full", out))
    assert_refused(capsys, code, out, "tokenizer.model", "sentencepiece", "pip install sentencepiece")


def copy_full_release(releases: Releases, folder: Path) -> tuple[Path, dict, dict]:
    shutil.copytree(releases.llava_full, folder)
    index_file = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    last = folder / "pytorch_model-00002-of-00002.bin"
    return last, index, torch.load(last, weights_only=True)


def save_full_release(folder: Path, index: dict, last_shard: dict) -> None:
    torch.save(last_shard, folder / "pytorch_model-00002-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("fault", ["extra", "missing", "unlisted", "absent", "shape", "rope", "adapter"])
def test_every_tensor_is_used_exactly_once(releases, tmp_path, capsys, fault):
    release = tmp_path / "release"
    expected = {
        "extra": ["unexpected", "model.layers.1.self_attn.extra.weight"],
        "missing": ["missing", "model.norm.weight"],
        "unlisted": ["not in the index", "model.layers.1.self_attn.extra.weight"],
        "absent": ["listed but absent", "model.norm.weight"],
        "shape": ["model.layers.1.mlp.up_proj.weight", "(64, 16)"],
        "rope": ["model.layers.0.self_attn.rotary_emb.inv_freq", "rope_theta"],
        "adapter": ["adapter_model.bin", "missing", "lora_B"],
    }[fault]
    if fault == "adapter":  # a LoRA layer without one of its matrices
        shutil.copytree(releases.llava_lora, release)
        adapter = torch.load(release / "adapter_model.bin", weights_only=True)
        del adapter["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
        torch.save(adapter, release / "adapter_model.bin")
        args = import_args(releases, "llava_lora", tmp_path / "out")
        args[args.index("--model-path") + 1] = str(release)
    else:
        _, index, last = copy_full_release(releases, release)
        if fault in ("extra", "unlisted"):
            last["model.layers.1.self_attn.extra.weight"] = torch.zeros(2, dtype=torch.float16)
            if fault == "extra":
                index["weight_map"]["model.layers.1.self_attn.extra.weight"] = "pytorch_model-00002-of-00002.bin"
        if fault in ("missing", "absent"):
            del last["model.norm.weight"]
            if fault == "missing":
                del index["weight_map"]["model.norm.weight"]
        if fault == "shape":
            last["model.layers.1.mlp.up_proj.weight"] = last["model.layers.1.mlp.up_proj.weight"][:, :16].clone()
        if fault == "rope":
            config = json.loads((release / "config.json").read_text())
            (release / "config.json").write_text(json.dumps({**config, "rope_theta": 500000.0}))
        save_full_release(release, index, last)
        args = ["import-llava", "--model-path", str(release), "--out", str(tmp_path / "out")]
    assert_refused(capsys, cli.main(args), tmp_path / "out", *expected)


def read_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("kind", ["llava_sp_pooling", "llava_full"])
def test_round_trip_through_llava_layout_gives_identical_tensors(imported, kind, tmp_path, capsys):
    exported = tmp_path / "llava-export"
    assert cli.main(["export-llava", "--model", str(imported[kind]), "--out", str(exported)]) == 0
    assert "note:" not in capsys.readouterr().out  # the name holds "llava", as LLaVA's loader needs
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["mm_projector_type"] == "mlp2x_gelu"
    assert config["mm_vision_tower"] == str((exported / "vision_tower").resolve())
    assert config["image_aspect_ratio"] == "pad" and config["hidden_size"] == 32 and config["mm_hidden_size"] == 16
    names = set(load_file(exported / "model.safetensors"))
    assert "model.mm_projector.2.bias" in names and "lm_head.weight" in names and "model.layers.0.mlp.up_proj.weight" in names
    assert ("model.conv_4.1.weight" in names) == (kind == "llava_sp_pooling")
    assert not (exported / "tokenizer.json").exists() and (exported / "tokenizer.model").is_file()
    assert "<image>" not in (exported / "tokenizer_config.json").read_text()  # LLaVA splits prompts on the text

    again = tmp_path / "again"
    assert cli.main(["import-llava", "--model-path", str(exported), "--out", str(again)]) == 0
    first, second = read_folder_tensors(imported[kind]), read_folder_tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    for key in ("projector_type", "projector_options", "image_token_id"):
        assert getattr(SpatialMLLMForConditionalGeneration.config_class.from_pretrained(again), key) == \
            getattr(SpatialMLLMForConditionalGeneration.config_class.from_pretrained(imported[kind]), key)
    a, b = SpatialMLLMProcessor.from_pretrained(imported[kind]), SpatialMLLMProcessor.from_pretrained(again)
    assert a.chat_template == b.chat_template and a.num_image_tokens == b.num_image_tokens
    text = vicuna_prompt(QUESTION)
    assert a.tokenizer(text)["input_ids"] == b.tokenizer(text)["input_ids"]


def test_keep_lora_and_the_lora_layout_round_trip(releases, imported, references, tmp_path, capsys):
    kept = tmp_path / "kept"
    assert cli.main(import_args(releases, "llava_sp_cropping", kept, "--dtype", "float32", "--keep-lora")) == 0
    assert "LoRA adapter kept beside it" in capsys.readouterr().out
    assert (kept / "adapter_config.json").is_file() and (kept / "adapter_model.safetensors").is_file()
    # loaded like a LoRA training run's folder: the adapter is listed as the folder's own and attached, and the
    # model is the merged one
    model = load_model_folder(kept)[0].eval()
    assert any("lora_A" in name for name, _ in model.named_parameters())
    reference = references["llava_sp_cropping"]
    ids = reference.input_ids(vicuna_prompt(QUESTION))
    pixels = reference.pixel_values(wide_image())
    with torch.no_grad():
        got = model(input_ids=torch.tensor([expand(ids, model.config.image_token_id, model.num_image_tokens)]),
                    pixel_values=pixels).logits[0]
    assert (got - reference.logits(ids, pixels)).abs().max() < 1e-4

    exported = tmp_path / "llava-sp-cropping-lora"
    assert cli.main(["export-llava", "--model", str(kept), "--out", str(exported), "--lora"]) == 0
    adapter = load_file(exported / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.layers.") for k in adapter)
    trainables = torch.load(exported / "non_lora_trainables.bin", weights_only=True)
    assert "base_model.model.model.conv_4.weight" in trainables and "base_model.model.model.conv_linear.1.bias" in trainables
    assert (exported / "base" / "tokenizer.model").is_file() and (exported / "base" / "model.safetensors").is_file()

    again = tmp_path / "again"
    assert cli.main(["import-llava", "--model-path", str(exported), "--model-base", str(exported / "base"),
                     "--out", str(again), "--keep-lora"]) == 0  # fmt: skip
    for name in ("model.safetensors", "adapter_model.safetensors"):
        first, second = load_file(kept / name), load_file(again / name)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name

    capsys.readouterr()
    code = cli.main(["export-llava", "--model", str(imported["llava_full"]), "--out", str(tmp_path / "x"), "--lora"])
    assert code == 2 and "holds no LoRA adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_by_default_the_release_dtype_is_kept_bit_for_bit(releases, tmp_path):
    out = tmp_path / "fp16"
    assert cli.main(["import-llava", "--model-path", str(releases.llava_full), "--out", str(out)]) == 0
    saved = load_file(out / "model.safetensors")
    shard = torch.load(releases.llava_full / "pytorch_model-00002-of-00002.bin", weights_only=True)
    assert saved["model.language_model.norm.weight"].dtype == torch.float16
    assert torch.equal(saved["model.language_model.norm.weight"], shard["model.norm.weight"])
    assert torch.equal(saved["model.projector.mlp.2.weight"], shard["model.mm_projector.2.weight"])


def test_stage2_training_starts_from_an_imported_release(imported, tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.setattr(cli, "COMMAND_MODULES", ("spatial_mllm.training.commands",))
    records = []
    for i in range(4):
        wide_image().rotate(90 * i, expand=True).save(tmp_path / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "A blue square."}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"train_json": str(tmp_path / "train.json"), "template": "vicuna_v1", "strict": True, "num_workers": 0},
        "stage": {"name": "instruct", "init_from": str(imported["llava_sp_pooling"])},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "optimisation": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 1},
        "output_dir": str(tmp_path / "run"),
    }))  # fmt: skip
    assert cli.main(["train", "--config", str(config)]) == 0, capsys.readouterr().err
    trained = SpatialMLLMForConditionalGeneration.from_pretrained(tmp_path / "run")
    assert trained.config.projector_type == "llava_sp_pooling" and trained.num_image_tokens == 582


@pytest.mark.parametrize("layout", ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                    "pytorch_model.bin.index.json"])  # fmt: skip
def test_every_checkpoint_layout_reads_the_same_tensors(tmp_path, layout):
    from safetensors.torch import save_file

    from spatial_mllm.weights.checkpoint_files import read_weights, weight_names

    state = {f"model.layers.{i}.w": torch.randn(3, 2) for i in range(3)} | {"lm_head.weight": torch.randn(4, 2)}
    save = (lambda d, p: save_file(d, str(p))) if "safetensors" in layout else (lambda d, p: torch.save(d, p))
    if layout.endswith(".index.json"):
        stem, suffix = ("model", "safetensors") if "safetensors" in layout else ("pytorch_model", "bin")
        names = sorted(state)
        groups = [names[:2], names[2:]]
        weight_map = {}
        for k, group in enumerate(groups, start=1):
            shard = f"{stem}-{k:05d}-of-00002.{suffix}"
            save({n: state[n] for n in group}, tmp_path / shard)
            weight_map.update(dict.fromkeys(group, shard))
        (tmp_path / layout).write_text(json.dumps({"weight_map": weight_map}))
    else:
        save(state, tmp_path / layout)
    read = read_weights(tmp_path)
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    assert weight_names(tmp_path) == set(state)


def test_a_model_built_here_round_trips_through_llava_layout(tmp_path):
    from tiny import tiny_model

    model, processor = tiny_model("llava_sp_pooling", seed=3, spatial_width=8)  # a 12x12 grid, another tokenizer
    model.save_pretrained(tmp_path / "ours")
    processor.save_pretrained(tmp_path / "ours")
    assert cli.main(["export-llava", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "llava-sp")]) == 0
    assert cli.main(["import-llava", "--model-path", str(tmp_path / "llava-sp"), "--out", str(tmp_path / "again")]) == 0
    first, second = read_folder_tensors(tmp_path / "ours"), read_folder_tensors(tmp_path / "again")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    again = SpatialMLLMProcessor.from_pretrained(tmp_path / "again")
    assert again.image_token_id == processor.image_token_id and again.num_image_tokens == 6 + 12 * 12


def test_a_tied_output_head_is_read_once(tmp_path):
    from spatial_mllm.weights.llava_import import _build_language_model

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=20, tie_word_embeddings=True)  # fmt: skip
    state = {k: torch.randn_like(v) for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    embeddings = state["model.embed_tokens.weight"]
    model = _build_language_model(config, dict(state), {}, "test")
    assert model.lm_head.weight is model.model.embed_tokens.weight and torch.equal(model.lm_head.weight, embeddings)
    with pytest.raises(ValueError, match="lm_head.weight differs from the tensor it is tied to"):
        _build_language_model(config, {**state, "lm_head.weight": torch.zeros(20, 16)}, {}, "test")
