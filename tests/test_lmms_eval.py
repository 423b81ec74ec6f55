"""The lmms-eval plugin's contract on built-in-world documents, without lmms-eval: requests are stand-ins whose
`.args` are what lmms-eval builds, and every answer and score is checked against the model run on its own.
The last tests use the real lmms-eval when it is installed."""

from __future__ import annotations

import importlib
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from spatial_mllm.evaluation import lmms_eval_model
from spatial_mllm.evaluation.lmms_eval_model import SpatialMLLMLmms, cut_at_stop, lmms_eval_manifest
from spatial_mllm.evaluation.runner import StopOnStrings
from tiny import save_sharpened_model, tiny_model

TASK, SPLIT = "world_spatial", "val"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_sharpened_model(tmp_path_factory.mktemp("model"))


# World-style questions, worded in the tiny tokenizer's vocabulary (the world's own text is mostly unknown to it).
QUESTIONS = [
    ("what color is the circle ?", "red"),
    ("is the square left of the triangle ?", "yes"),
    ("how many objects are there ?", "three"),
    ("what shape is at the top ?", "circle"),
    ("is there a blue square ?", "no"),
    ("which is larger , the circle or the square ?", "the circle"),
    ("where is the yellow triangle ?", "bottom left"),
    ("is the green circle above the red square ?", "yes"),
]


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> list[dict]:
    """Documents as an lmms-eval task over the built-in world would hold them: a question, its scene, its answer."""
    from spatial_mllm.demo.world import make_world

    world = tmp_path_factory.mktemp("world")
    make_world(world, n_train=0, n_val=3, n_test=0, n_holdout=0, progress=False)
    scenes = [Image.open(path).convert("RGB") for path in sorted((world / "images").glob("*.png"))]
    assert len(scenes) == 3
    return [
        {"question": question, "image": scenes[index % len(scenes)], "answer": answer}
        for index, (question, answer) in enumerate(QUESTIONS)
    ]


@pytest.fixture(scope="module")
def lm(model_dir, docs) -> SpatialMLLMLmms:
    model = SpatialMLLMLmms(pretrained=str(model_dir), device="cpu", batch_size=4)
    model.task_dict = {TASK: {SPLIT: docs}}  # what lmms-eval's evaluator fills in
    return model


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [doc["image"]]


def generation_request(doc_id: int, docs: list[dict], **gen_kwargs) -> SimpleNamespace:
    return SimpleNamespace(args=(docs[doc_id]["question"], gen_kwargs, doc_to_visual, doc_id, TASK, SPLIT))


def scoring_request(doc_id: int, docs: list[dict], continuation) -> SimpleNamespace:
    return SimpleNamespace(args=(docs[doc_id]["question"], continuation, doc_to_visual, doc_id, TASK, SPLIT))


def prompt_ids(lm: SpatialMLLMLmms, text: str, with_image: bool = True) -> list[int]:
    content = f"<image>\n{text}" if with_image else text
    prompt = lm.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [Image.new("RGB", (4, 4))] if with_image else []
    return lm.processor(images=images, text=prompt)["input_ids"][0].tolist()


def greedy_alone(lm: SpatialMLLMLmms, doc: dict, max_new_tokens: int) -> list[int]:
    """The model's greedy tokens for one document, unbatched and unpadded."""
    ids = prompt_ids(lm, doc["question"])
    output = lm.model.generate(
        input_ids=torch.tensor([ids]), pixel_values=lm.processor.image_transform([doc["image"]]),
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
    )  # fmt: skip
    new = output[0, len(ids) :].tolist()
    return new[: new.index(lm.tokenizer.eos_token_id) + 1] if lm.tokenizer.eos_token_id in new else new


def decode(lm: SpatialMLLMLmms, ids: list[int]) -> str:
    return lm.tokenizer.decode(ids, skip_special_tokens=True).strip()


def logprob_alone(lm: SpatialMLLMLmms, context_ids: list[int], reply_words: list[str], image) -> tuple[float, bool]:
    """log P(reply | context) and greedy-ness from one unpadded forward pass."""
    targets = lm.tokenizer.convert_tokens_to_ids(reply_words)
    ids = torch.tensor([context_ids + targets])
    pixel_values = lm.processor.image_transform([image]) if image is not None else None
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, pixel_values=pixel_values).logits[0]
    predictors = logits[len(context_ids) - 1 : len(context_ids) - 1 + len(targets)]
    logprob = predictors.log_softmax(-1)[torch.arange(len(targets)), torch.tensor(targets)].sum().item()
    return logprob, predictors.argmax(-1).tolist() == targets


def test_generate_until_answers_every_request_in_order(lm, docs):
    requests = [generation_request(i, docs, max_new_tokens=4, until=["\n\n"]) for i in range(len(docs))]
    expected = [decode(lm, greedy_alone(lm, doc, 4)) for doc in docs]
    assert len(set(expected)) > 1  # the order check below means something
    for batch_size in (1, 4):
        lm.batch_size = batch_size
        answers = lm.generate_until(requests)
        assert answers == expected
        assert all(isinstance(answer, str) for answer in answers)
    assert lm.generate_until(requests[::-1]) == expected[::-1]


def test_generate_until_respects_each_max_new_tokens(lm, docs):
    lm.batch_size = 4
    budgets = [1, 3, 6, 2]
    requests = [generation_request(i, docs, max_new_tokens=n) for i, n in enumerate(budgets)]
    answers = lm.generate_until(requests)
    for doc, budget, answer in zip(docs, budgets, answers):
        tokens = greedy_alone(lm, doc, budget)
        assert len(tokens) <= budget
        assert answer == decode(lm, tokens)
        assert len(lm.tokenizer(answer, add_special_tokens=False)["input_ids"]) <= budget
    # A task without max_new_tokens gets the model's default.
    lm.max_new_tokens = 5
    assert lm.generate_until([generation_request(0, docs)]) == [decode(lm, greedy_alone(lm, docs[0], 5))]


def test_generate_until_stops_at_until_strings(lm, docs):
    lm.batch_size = 4
    full = [decode(lm, greedy_alone(lm, doc, 8)) for doc in docs[:4]]
    # Stop at the second word each answer says (a string it contains), or at a string it never says.
    stops = [answer.split()[1] if len(answer.split()) > 1 else "zebra" for answer in full]
    requests = [generation_request(i, docs, max_new_tokens=8, until=[stop]) for i, stop in enumerate(stops)]
    requests[3] = generation_request(3, docs, max_new_tokens=8, until=stops[3])  # a lone string is allowed too
    answers = lm.generate_until(requests)
    for answer, text, stop in zip(answers, full, stops):
        cut = text.find(stop)
        assert answer == (text[:cut] if cut >= 0 else text).strip()
    assert any(stop in text for text, stop in zip(full, stops))


def test_stop_strings_stop_each_row_on_its_own():
    _, processor = tiny_model("mlp2x_gelu")
    tokenizer = processor.tokenizer
    prompt = tokenizer.convert_tokens_to_ids(["what", "color", "?"])
    generated = [["red", "circle"], ["blue", "square"], ["red", "circle"]]
    input_ids = torch.tensor([prompt + tokenizer.convert_tokens_to_ids(words) for words in generated])
    criterion = StopOnStrings(tokenizer, [["circle"], ["circle", "triangle"], []], prompt_width=len(prompt))
    assert criterion(input_ids, None).tolist() == [True, False, False]
    # "color" is in the prompt, not in what was generated
    assert StopOnStrings(tokenizer, [["color"]] * 3, len(prompt))(input_ids, None).tolist() == [False] * 3
    assert cut_at_stop("left of the red circle. yes", [".", "red"]) == "left of the "


@pytest.mark.parametrize(
    ("gen_kwargs", "asked"),
    [({"do_sample": True}, "'do_sample': True"), ({"temperature": 0.7}, "'temperature': 0.7"),
     ({"num_beams": 3}, "'num_beams': 3")],
)  # fmt: skip
def test_generate_until_refuses_sampling(lm, docs, gen_kwargs, asked):
    message = f"task '{TASK}' doc 2: spatial_mllm decodes greedily, the task asks for .*{asked}"
    with pytest.raises(ValueError, match=message):
        lm.generate_until([generation_request(2, docs, **gen_kwargs)])


def test_loglikelihood_equals_the_model_logits(lm, docs):
    first_word = lm.tokenizer.convert_ids_to_tokens(greedy_alone(lm, docs[1], 1))[0]
    requests = [
        scoring_request(0, docs, " yes"),
        scoring_request(1, docs, f" {first_word}"),  # what greedy decoding says first
        scoring_request(2, docs, " left of the circle"),
        scoring_request(3, docs, lambda doc: doc["answer"]),  # lmms-eval may pass doc_to_target
        SimpleNamespace(args=("", " no")),  # acc_mutual_info's unconditional request
    ]
    expected = [
        logprob_alone(lm, prompt_ids(lm, docs[0]["question"]), ["yes"], docs[0]["image"]),
        logprob_alone(lm, prompt_ids(lm, docs[1]["question"]), [first_word], docs[1]["image"]),
        logprob_alone(lm, prompt_ids(lm, docs[2]["question"]), ["left", "of", "the", "circle"], docs[2]["image"]),
        logprob_alone(lm, prompt_ids(lm, docs[3]["question"]), docs[3]["answer"].split(), docs[3]["image"]),
        logprob_alone(lm, prompt_ids(lm, "", with_image=False), ["no"], None),
    ]
    assert expected[1][1] is True
    assert any(greedy is False for _, greedy in expected)
    for batch_size in (1, 3):
        lm.batch_size = batch_size
        results = lm.loglikelihood(requests)
        assert len(results) == len(requests)
        for (logprob, greedy), (want_logprob, want_greedy) in zip(results, expected):
            assert isinstance(logprob, float) and isinstance(greedy, bool)
            assert logprob == pytest.approx(want_logprob, abs=1e-4)
            assert greedy == want_greedy
    # A longer continuation is less likely than its first word alone.
    assert expected[2][0] < logprob_alone(lm, prompt_ids(lm, docs[2]["question"]), ["left"], docs[2]["image"])[0]


def test_contexts_may_hold_their_image_placeholders(lm, docs):
    lm.batch_size = 2
    doc = docs[0]
    with_placeholder = SimpleNamespace(args=(f"<image>\n{doc['question']}", " yes", doc_to_visual, 0, TASK, SPLIT))
    plain, placed = lm.loglikelihood([scoring_request(0, docs, " yes"), with_placeholder])
    assert plain == pytest.approx(placed)
    two_placeholders = SimpleNamespace(args=("<image> <image> what ?", {}, doc_to_visual, 0, TASK, SPLIT))
    with pytest.raises(ValueError, match=f"task '{TASK}' doc 0: the context holds 2 <image> for 1 image"):
        lm.generate_until([two_placeholders])
    not_an_image = SimpleNamespace(args=("what ?", {}, lambda doc: ["clip.mp4"], 0, TASK, SPLIT))
    with pytest.raises(ValueError, match="reads images \\(PIL\\), the task gives str"):
        lm.generate_until([not_an_image])


def test_model_args_errors(model_dir):
    with pytest.raises(ValueError, match="unknown model_args conv_template"):
        SpatialMLLMLmms(pretrained=str(model_dir), conv_template="vicuna")
    with pytest.raises(ValueError, match="needs pretrained=DIR"):
        SpatialMLLMLmms()
    with pytest.raises(ValueError, match="batch size must be a number, got 'auto'"):
        SpatialMLLMLmms(pretrained=str(model_dir), batch_size="auto")
    with pytest.raises(ValueError, match="dtype 'half_precision' is not a torch dtype"):
        SpatialMLLMLmms(pretrained=str(model_dir), dtype="half_precision")
    with pytest.raises(FileNotFoundError, match="missing: no such folder"):
        SpatialMLLMLmms(pretrained=str(model_dir / "missing"))


def test_pyproject_entry_point_gives_lmms_eval_a_manifest():
    # lmms-eval 0.7 calls a callable entry point and expects a ModelManifest back; calling the model class
    # instead would try to load a model without arguments.
    entry = tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"]["lmms_eval.models"]["spatial_mllm"]
    module_name, attribute = entry.split(":")
    assert getattr(importlib.import_module(module_name), attribute) is lmms_eval_manifest


def lmms_eval_installed() -> bool:
    try:
        importlib.import_module("lmms_eval.api.model")
    except ImportError:
        return False
    return True


def test_lmms_eval_class_asks_for_lmms_eval(monkeypatch):
    # As on a machine without lmms-eval: its import fails, and the class is made afresh on first access.
    monkeypatch.setitem(sys.modules, "lmms_eval.api.model", None)
    monkeypatch.delitem(vars(lmms_eval_model), "SpatialMLLMLmmsEval", raising=False)
    with pytest.raises(ImportError, match="needs lmms-eval: pip install lmms-eval .*--no-deps"):
        lmms_eval_model.SpatialMLLMLmmsEval  # noqa: B018


@pytest.mark.skipif(not lmms_eval_installed(), reason="lmms-eval is not installed")
def test_real_lmms_eval_finds_and_runs_the_model(model_dir, docs, lm):
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.register_manifest(lmms_eval_manifest())
    model_class = registry.get_model_class("spatial_mllm")  # imports and validates as lmms-eval does
    assert issubclass(model_class, lmms) and issubclass(model_class, SpatialMLLMLmms)
    model = model_class.create_from_arg_string(f"pretrained={model_dir}", {"batch_size": "2", "device": "cpu"})
    model.task_dict = {TASK: {SPLIT: docs}}

    def instance(kind: str, doc_id: int, arguments: tuple) -> Instance:
        return Instance(request_type=kind, arguments=arguments, idx=0,
                        metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})  # fmt: skip

    generation = [
        instance("generate_until", i, (docs[i]["question"], {"max_new_tokens": 3}, doc_to_visual, i, TASK, SPLIT))
        for i in range(3)
    ]
    lm.batch_size = 3
    assert model.generate_until(generation) == lm.generate_until([SimpleNamespace(args=r.args) for r in generation])
    scoring = [
        instance("loglikelihood", i, (docs[i]["question"], " yes", doc_to_visual, i, TASK, SPLIT)) for i in range(3)
    ]
    results = model.loglikelihood(scoring)
    expected = lm.loglikelihood([SimpleNamespace(args=r.args) for r in scoring])
    assert [greedy for _, greedy in results] == [greedy for _, greedy in expected]
    assert [logprob for logprob, _ in results] == pytest.approx([logprob for logprob, _ in expected], abs=1e-4)
