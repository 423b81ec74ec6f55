"""lmms-eval plugin: run any lmms-eval task on a trained spatial-mllm folder.

    lmms-eval --model spatial_mllm --model_args pretrained=runs/llava_sp --tasks mme --batch_size 8

lmms-eval 0.7 finds plugin models through the entry-point group "lmms_eval.models"; an entry must give a
ModelManifest or a callable returning one, which is `lmms_eval_manifest`. The manifest names
`SpatialMLLMLmmsEval`, which lmms-eval requires to subclass its `lmms` base. That class is made on first access,
from `SpatialMLLMLmms` (all the behaviour, usable and tested without lmms-eval) and lmms-eval's base, so importing
this module never imports lmms-eval.

Contract (lmms-eval's `lmms`): requests are objects whose `.args` are
  generate_until: (context, gen_kwargs, doc_to_visual, doc_id, task, split), one greedy string per request;
  loglikelihood:  (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split), or
                  (context, continuation) for the unconditional requests of acc_mutual_info; one (logprob, is_greedy)
                  per request.
doc_to_visual(self.task_dict[task][split][doc_id]) gives the document's PIL images; lmms-eval fills `task_dict`.
The context becomes the user turn of the model's conversation template, with one "<image>\\n" per image in front
unless it holds the placeholders itself. Under `accelerate launch` or torchrun, lmms-eval gives each process its
share of the requests, and each process puts the model on its own GPU (cuda:LOCAL_RANK).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..model import IGNORE_INDEX, IMAGE_TOKEN, Segment
from ..model.loading import load_for_inference
from .runner import generate_batch

MODEL_ID = "spatial_mllm"  # the name given to lmms-eval's --model


@dataclass(frozen=True)
class _Prompt:
    text: str  # rendered by the processor's chat template, `<image>` placeholders in it
    images: list[Image.Image]


@dataclass(frozen=True)
class _Generation:
    prompt: _Prompt
    until: tuple[str, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class _Scoring:
    input_ids: list[int]  # context and continuation, tokenised together as the template joins them
    images: list[Image.Image]
    start: int  # continuation tokens: input_ids[start:end]
    end: int


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the earliest stop string (lmms-eval's `until`)."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text


class SpatialMLLMLmms:
    """lmms-eval's model contract for a spatial-mllm folder; greedy decoding, batched.

    model_args: pretrained=DIR (required), device (default cuda:LOCAL_RANK when a GPU is there), dtype (float32,
    bfloat16, float16; default: as saved), template (default: the processor's own, the one it was trained with),
    max_new_tokens (when a task gives none; default 256). batch_size and max_batch_size come from lmms-eval's
    --batch_size / --max_batch_size; "auto" batch sizes are not supported.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it; it only matters for "auto" batch sizes
        template: str | None = None,
        max_new_tokens: int = 256,
        **unknown: Any,
    ):
        super().__init__()  # lmms-eval's base sets rank, world size, cache hook and task_dict
        if unknown:
            raise ValueError(f"{MODEL_ID}: unknown model_args {', '.join(sorted(unknown))}")
        if pretrained is None:
            raise ValueError(f"{MODEL_ID}: model_args needs pretrained=DIR, the trained model folder")
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"{MODEL_ID}: batch size must be a number, got {batch_size!r}") from None
        if self.batch_size < 1 or int(max_new_tokens) < 1:
            raise ValueError(f"{MODEL_ID}: batch_size and max_new_tokens must be at least 1")
        self.max_new_tokens = int(max_new_tokens)
        self.device = device or _default_device()
        self.model, self.processor = load_for_inference(pretrained, _torch_dtype(dtype), self.device)
        self.tokenizer = self.processor.tokenizer
        if template is not None:
            self.processor.use_template(template)
        self.task_dict: dict[str, Any] = {}

    # --- generate_until -----------------------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """One greedy answer per request, in request order, cut at the task's `until` strings."""
        jobs = [self._generation(request) for request in requests]
        answers: list[str] = []
        for start in range(0, len(jobs), self.batch_size):
            answers += self._generate(jobs[start : start + self.batch_size])
        return answers

    def _generation(self, request: Any) -> _Generation:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = _unpack(request, 6, "generate_until")
        where = f"task {task!r} doc {doc_id}"
        until, max_new_tokens = self._generation_settings(gen_kwargs, where)
        images = self._visuals(doc_to_visual, doc_id, task, split, where)
        user = {"role": "user", "content": _user_content(context, len(images), where)}
        text = self.processor.apply_chat_template([user], add_generation_prompt=True)
        return _Generation(_Prompt(text, images), until, max_new_tokens)

    def _generation_settings(self, gen_kwargs: Mapping[str, Any] | None, where: str) -> tuple[tuple[str, ...], int]:
        gen_kwargs = gen_kwargs or {}
        sampling = gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0
        if sampling or (gen_kwargs.get("num_beams") or 1) != 1:
            asked = {k: gen_kwargs.get(k) for k in ("do_sample", "temperature", "num_beams") if k in gen_kwargs}
            raise ValueError(f"{where}: {MODEL_ID} decodes greedily, the task asks for {asked}")
        until = gen_kwargs.get("until") or ()
        if isinstance(until, str):
            until = (until,)
        if not all(isinstance(stop, str) and stop for stop in until):
            raise ValueError(f"{where}: gen_kwargs 'until' must be a string or a list of non-empty strings: {until!r}")
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        return tuple(until), max_new_tokens

    def _generate(self, jobs: list[_Generation]) -> list[str]:
        continuations = generate_batch(
            self.model,
            self.processor,
            [job.prompt.text for job in jobs],
            [image for job in jobs for image in job.prompt.images],
            max(job.max_new_tokens for job in jobs),
            [job.until for job in jobs],
        )
        answers = []
        for job, continuation in zip(jobs, continuations):
            # The batch ran to its longest budget; greedy decoding makes each row's own budget a prefix of it.
            text = self.tokenizer.decode(continuation[: job.max_new_tokens], skip_special_tokens=True)
            answers.append(cut_at_stop(text, job.until).strip())
        return answers

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID} does not support multi-round generation tasks")

    # --- loglikelihood ------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding yields the continuation) per request.

        The continuation is scored as the assistant's reply to the context (leading and trailing whitespace
        dropped: the template places it), without the template's end-of-turn marker, as lm-eval scores
        continuations.
        """
        jobs = [self._scoring(request) for request in requests]
        results: list[tuple[float, bool]] = []
        for start in range(0, len(jobs), self.batch_size):
            results += self._score(jobs[start : start + self.batch_size])
        return results

    def _scoring(self, request: Any) -> _Scoring:
        if len(request.args) == 2:  # acc_mutual_info's unconditional requests: no document, no image
            context, continuation = request.args
            where, images = "unconditional loglikelihood request", []
        else:
            context, target, doc_to_visual, doc_id, task, split = _unpack(request, 6, "loglikelihood")
            where = f"task {task!r} doc {doc_id}"
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id, where))
            images = self._visuals(doc_to_visual, doc_id, task, split, where)
        if not isinstance(continuation, str) or not continuation.strip():
            raise ValueError(f"{where}: the continuation must be non-empty text, got {continuation!r}")
        reply = continuation.strip()
        user = {"role": "user", "content": _user_content(context, len(images), where)}
        rendered = self.processor.conversation_segments([user, {"role": "assistant", "content": reply}], where)
        # Tokenised as for training and labelled by character offsets: exact, and a token that straddles the reply
        # and the end of turn is an error rather than a silent misalignment.
        input_ids, labels = self.processor.tokenize_segments(_scored_segments(rendered, reply), where)
        scored = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        if not scored:
            raise ValueError(f"{where}: the continuation {continuation!r} gives no tokens to score")
        return _Scoring(input_ids, images, scored[0], scored[-1] + 1)

    @torch.inference_mode()
    def _score(self, jobs: list[_Scoring]) -> list[tuple[float, bool]]:
        # Left padding puts every row's end at the same place, so only the last `keep` logits are needed.
        rows = [job.input_ids for job in jobs]
        width = max(len(row) for row in rows)
        keep = max(len(row) - job.start + 1 for row, job in zip(rows, jobs))
        padded = self.tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
        input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        images = [image for job in jobs for image in job.images]
        pixel_values = self.processor.image_transform(images).to(self.model.device) if images else None
        logits = self.model(
            input_ids=input_ids.to(self.model.device),
            attention_mask=attention_mask.to(self.model.device),
            position_ids=position_ids.to(self.model.device),
            pixel_values=pixel_values,
            logits_to_keep=keep,
        ).logits.float()
        results = []
        for index, job in enumerate(jobs):
            # Token at sequence position p is predicted by the logits at p - 1; kept logits start at width - keep.
            shift = width - len(job.input_ids) - (width - keep) - 1
            predictors = torch.arange(job.start, job.end) + shift
            targets = torch.tensor(job.input_ids[job.start : job.end])
            row_logits = logits[index, predictors.to(logits.device)].cpu()
            logprob = row_logits.log_softmax(-1).gather(-1, targets[:, None]).sum().item()
            results.append((float(logprob), bool((row_logits.argmax(-1) == targets).all())))
        return results

    # --- documents and images -------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int, where: str) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError):
            raise ValueError(f"{where}: no such document in task_dict (lmms-eval fills it before asking)") from None

    def _visuals(
        self, doc_to_visual: Callable[[Any], Any] | None, doc_id: int, task: str, split: str, where: str
    ) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id, where))
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise ValueError(f"{where}: {MODEL_ID} reads images (PIL), the task gives {type(visual).__name__}")
        return [visual.convert("RGB") for visual in visuals]


def _unpack(request: Any, size: int, kind: str) -> tuple:
    args = request.args
    if len(args) != size:
        raise ValueError(f"a {kind} request needs {size} arguments, got {len(args)}: {args!r}")
    return tuple(args)


def _user_content(context: str, n_images: int, where: str) -> str:
    placeholders = context.count(IMAGE_TOKEN)
    if placeholders == 0:
        return f"{IMAGE_TOKEN}\n" * n_images + context
    if placeholders != n_images:
        raise ValueError(f"{where}: the context holds {placeholders} {IMAGE_TOKEN} for {n_images} image(s)")
    return context


def _scored_segments(segments: list[Segment], reply: str) -> list[Segment]:
    """The rendered conversation with only the reply supervised. The template's separator before the reply stays
    with it (a word's leading space belongs to its token); the end-of-turn text after it is not scored."""
    last = max(i for i, segment in enumerate(segments) if segment.supervised)
    text = segments[last].text
    reply_end = text.index(reply) + len(reply)
    scored = [Segment(text[:reply_end], True), Segment(text[reply_end:], False)]
    return [Segment(segment.text, False) for segment in segments[:last]] + scored + segments[last + 1 :]


def _default_device() -> str:
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def _torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{MODEL_ID}: dtype {name!r} is not a torch dtype (float32, bfloat16, float16)")
    return dtype


def lmms_eval_manifest():
    """The entry point lmms-eval loads: registers `SpatialMLLMLmmsEval` under the model name "spatial_mllm"."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.SpatialMLLMLmmsEval")


def _lmms_eval_class() -> type:
    try:
        from lmms_eval.api.model import lmms
    except ImportError as err:
        raise ImportError(
            "SpatialMLLMLmmsEval needs lmms-eval: pip install lmms-eval (on a CPU-only machine "
            "pip install --no-deps lmms-eval pytz loguru, since its dependencies pull a CUDA build of torch); "
            "SpatialMLLMLmms works without it"
        ) from err

    class SpatialMLLMLmmsEval(SpatialMLLMLmms, lmms):
        """SpatialMLLMLmms as an lmms-eval model."""

    SpatialMLLMLmmsEval.__module__ = __name__
    SpatialMLLMLmmsEval.__qualname__ = "SpatialMLLMLmmsEval"
    return SpatialMLLMLmmsEval


def __getattr__(name: str) -> Any:
    # Module attribute made on first access (PEP 562), so that lmms-eval is imported only when it asks.
    if name == "SpatialMLLMLmmsEval":
        cls = globals()[name] = _lmms_eval_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODEL_ID", "SpatialMLLMLmms", "cut_at_stop", "lmms_eval_manifest"]
