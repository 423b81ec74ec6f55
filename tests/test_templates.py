"""Conversation templates (the processor's chat_template) and label masking on real tokenizers: a byte-level BPE
trained by our tokenizer.py and a Llama-like SentencePiece-style BPE (Metaspace, byte fallback, BOS added by
default), both built in memory."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizer

from fixtures.llava_data import processor_for
from spatial_mllm import cli
from spatial_mllm.demo.tokenizer import train_world_tokenizer
from spatial_mllm.model import IGNORE_INDEX, IMAGE_TOKEN, VICUNA_SYSTEM, LabelMismatchError, Segment, TemplateError
from spatial_mllm.model.chat_templates import resolve_chat_template
from spatial_mllm.model.conversation import verify_labels

QUESTION_1 = "<image>\nWhat is left of the blue circle?"
ANSWER_1 = "The red square."
QUESTION_2 = "How many shapes are there?"
ANSWER_2 = "Three: 2 squares and 1 circle, 5€ each."
CONVERSATION = [
    {"role": "user", "content": QUESTION_1},
    {"role": "assistant", "content": ANSWER_1},
    {"role": "user", "content": QUESTION_2},
    {"role": "assistant", "content": ANSWER_2},
]
TEXTS = [QUESTION_1, ANSWER_1, QUESTION_2, ANSWER_2, "A blue circle is right of the red square.", VICUNA_SYSTEM] * 3
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NUM_IMAGE_TOKENS = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return train_world_tokenizer(TEXTS, tmp_path_factory.mktemp("world_tokenizer"), vocab_size=400)


def llama_like(chat_template: str | None = None):
    """SentencePiece-style BPE: words never merge across spaces, unknown characters fall back to bytes."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False)
    backend.train_from_iterator(TEXTS, trainer)
    model = json.loads(backend.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], add_bos_token=True)
    extra = [IMAGE_TOKEN] + (["<|im_start|>", "<|im_end|>"] if chat_template else [])
    tokenizer.add_special_tokens({"extra_special_tokens": extra})
    tokenizer.chat_template = chat_template
    return tokenizer


def tokenizer_for(kind: str, world):
    return world if kind == "world" else llama_like(CHATML if kind == "llama_chatml" else None)


def supervised_runs(tokenizer, input_ids, labels) -> list[str]:
    """Decoded runs of consecutive supervised tokens, computed here independently of verify_labels."""
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
    return [tokenizer.decode(run, skip_special_tokens=False).strip() for run in runs]


CASES = [
    ("world", "plain", [ANSWER_1]),
    ("world", "vicuna_v1", [ANSWER_1 + "</s>", ANSWER_2 + "</s>"]),
    ("world", "chat_template", [ANSWER_1 + "</s>", ANSWER_2 + "</s>"]),
    ("llama", "plain", [ANSWER_1]),
    ("llama", "vicuna_v1", [ANSWER_1 + "</s>", ANSWER_2 + "</s>"]),
    ("llama_chatml", "chat_template", [ANSWER_1 + "<|im_end|>", ANSWER_2 + "<|im_end|>"]),
]


@pytest.mark.parametrize("kind,template,answers", CASES)
def test_supervised_tokens_are_exactly_the_answers(kind, template, answers, world):
    tokenizer = tokenizer_for(kind, world)
    conversation = CONVERSATION[:2] if template == "plain" else CONVERSATION
    encoded = processor_for(tokenizer, template, NUM_IMAGE_TOKENS).encode_conversation(conversation, name="sample 0")
    ids, labels = encoded.input_ids, encoded.labels
    assert len(ids) == len(labels)
    # The plain separator "\n" is supervised too; strip() in supervised_runs hides it, so check it separately.
    assert supervised_runs(tokenizer, ids, labels) == answers
    if template == "plain":
        last = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX][-1]
        assert tokenizer.decode([last]) == "\n"

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    positions = [i for i, t in enumerate(ids) if t == image_id]
    assert len(positions) == NUM_IMAGE_TOKENS
    assert positions == list(range(positions[0], positions[0] + NUM_IMAGE_TOKENS))
    assert all(labels[i] == IGNORE_INDEX for i in positions)

    # Both tokenizers add BOS by default: exactly one, first.
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("kind,template,answers", CASES)
def test_inference_prompt_is_the_training_prefix(kind, template, answers, world):
    tokenizer = tokenizer_for(kind, world)
    processor = processor_for(tokenizer, template, NUM_IMAGE_TOKENS)
    conversation = CONVERSATION[:2] if template == "plain" else CONVERSATION
    training = processor.encode_conversation(conversation)
    text = processor.apply_chat_template(conversation[:-1], add_generation_prompt=True)
    images = [Image.new("RGB", (8, 8))] * text.count(IMAGE_TOKEN)
    prompt = processor(images=images, text=text)["input_ids"][0].tolist()
    assert training.input_ids[: len(prompt)] == prompt
    # Everything after the prompt is the last answer, supervised to the end.
    rest = training.labels[len(prompt):]
    assert IGNORE_INDEX not in rest
    assert tokenizer.decode(rest, skip_special_tokens=False).strip() == answers[-1]
    with pytest.raises(ValueError, match="ends with a user turn"):
        processor.apply_chat_template(conversation, add_generation_prompt=True)


def test_vicuna_v1_renders_llava_format(world):
    processor = processor_for(world, "vicuna_v1", NUM_IMAGE_TOKENS)
    text = processor.apply_chat_template(CONVERSATION)
    assert text == (
        f"{VICUNA_SYSTEM} USER: {QUESTION_1} ASSISTANT: {ANSWER_1}</s>USER: {QUESTION_2} ASSISTANT: {ANSWER_2}</s>"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:2]]
    text = processor.apply_chat_template(with_system)
    assert text == f"Be brief. USER: {QUESTION_1} ASSISTANT: {ANSWER_1}</s>"
    prompt = processor.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True)
    assert prompt == f"{VICUNA_SYSTEM} USER: {QUESTION_1} ASSISTANT:"
    # OpenAI / transformers content parts render as LLaVA's placeholder then the text.
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION_1.split("\n", 1)[1]}]}]
    assert processor.apply_chat_template(parts, add_generation_prompt=True) == prompt


def test_plain_drops_the_human_text(world):
    processor = processor_for(world, "plain", NUM_IMAGE_TOKENS)
    segments = processor.conversation_segments(CONVERSATION[:2])
    assert segments == [Segment(IMAGE_TOKEN, False), Segment(ANSWER_1 + "\n", True)]
    assert processor.check_conversation(CONVERSATION) is not None


def test_world_chat_template_matches_vicuna_v1(world):
    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    for conversation in (CONVERSATION, with_system):
        vicuna = processor_for(world, "vicuna_v1", NUM_IMAGE_TOKENS).encode_conversation(conversation)
        chat = processor_for(world, "chat_template", NUM_IMAGE_TOKENS).encode_conversation(conversation)
        assert chat.input_ids == vicuna.input_ids and chat.labels == vicuna.labels


def test_chat_template_that_rewrites_earlier_turns_is_rejected(world):
    tokenizer = llama_like()
    # Marks only the latest user turn: adding a turn changes the text of the earlier one.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' and loop.revindex <= 2 %}LATEST {% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(TemplateError, match="sample 7: .*not prefix-stable"):
        processor_for(tokenizer, "chat_template", NUM_IMAGE_TOKENS).encode_conversation(CONVERSATION, name="sample 7")


def test_chat_template_rejection_is_a_template_error():
    tokenizer = llama_like("{{ raise_exception('no multi-turn here') }}")
    with pytest.raises(TemplateError, match="sample 1: .*no multi-turn here"):
        processor_for(tokenizer, "chat_template", NUM_IMAGE_TOKENS).encode_conversation(CONVERSATION, name="sample 1")


def test_token_across_the_reply_boundary_is_an_error(world):
    splits_a_word = "USER: the red squ{% generation %}are.</s>{% endgeneration %}"
    for tokenizer in (world, llama_like()):
        with pytest.raises(TemplateError, match="spans the boundary"):
            processor_for(tokenizer, splits_a_word, NUM_IMAGE_TOKENS).encode_conversation(CONVERSATION, name="x")


def test_verify_labels_catches_shifted_and_fully_masked_labels(world):
    encoded = processor_for(world, "vicuna_v1", NUM_IMAGE_TOKENS).encode_conversation(CONVERSATION)
    ids, labels, segments = encoded.input_ids, encoded.labels, encoded.segments
    shifted = [IGNORE_INDEX] + labels[:-1]  # one position late: labels no longer match their tokens
    with pytest.raises(LabelMismatchError, match="data.json record 4: label"):
        verify_labels(world, ids, shifted, segments, "data.json record 4")
    with pytest.raises(LabelMismatchError, match="2 supervised spans expected, 0 found"):
        verify_labels(world, ids, [IGNORE_INDEX] * len(ids), segments, "data.json record 4")
    wrong_answer = [Segment(s.text.replace("red", "blue"), s.supervised) for s in segments]
    with pytest.raises(LabelMismatchError, match="'The red square.</s>' but the reply is 'The blue square.</s>'"):
        verify_labels(world, ids, labels, wrong_answer, "data.json record 4")


def test_tokenizer_without_image_token_is_refused():
    vocab = llama_like().get_vocab()
    without = LlamaTokenizer(vocab={t: i for t, i in vocab.items() if t != IMAGE_TOKEN}, merges=[])
    with pytest.raises(ValueError, match="has no <image> token"):
        processor_for(without, "vicuna_v1", NUM_IMAGE_TOKENS)
    # In the vocabulary but not a special token: the pre-tokenizer cuts it into pieces.
    as_text = LlamaTokenizer(vocab=vocab, merges=[])
    with pytest.raises(ValueError, match="splits <image> into several tokens"):
        processor_for(as_text, "vicuna_v1", NUM_IMAGE_TOKENS)


def test_unknown_template_names_the_known_ones():
    with pytest.raises(ValueError, match="chat_template, plain, vicuna_v1"):
        resolve_chat_template("llama_2")


def test_world_tokenizer_folder_loads_and_is_lossless(world, tmp_path):
    world.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for token in ("<s>", "</s>", "<unk>", "<pad>", IMAGE_TOKEN):
        assert loaded.convert_tokens_to_ids(token) != loaded.unk_token_id or token == "<unk>"
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    text = "Ünïcode ✓ never seen: 水 3.14\n\ttabs"
    assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    assert loaded.chat_template == world.chat_template


def test_tokenizer_command_trains_on_a_world_folder(tmp_path):
    world_dir = tmp_path / "world"
    world_dir.mkdir()
    records = [{"id": i, "conversations": [{"from": "human", "value": "<image>\nWhere is the triangle?"},
                                           {"from": "gpt", "value": "The triangle is above the square."}]}
               for i in range(3)]
    (world_dir / "train.json").write_text(json.dumps(records))
    (world_dir / "questions.jsonl").write_text(json.dumps({"question_id": 0, "text": "Is the octagon red?"}) + "\n")
    out = tmp_path / "tok"
    assert cli.main(["data", "tokenizer", "--world", str(world_dir), "--out", str(out), "--vocab-size", "600"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = tokenizer.get_vocab()
    # Merges were learnt from both files' words; <image> stayed a single special token.
    assert "Ġtriangle" in vocab and "Ġoctagon" in vocab
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"] == [vocab[IMAGE_TOKEN]]
