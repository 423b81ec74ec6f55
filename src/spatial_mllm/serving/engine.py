"""The generation engine: one thread owns the model and decodes a batch of sequences step by step (continuous
batching). Between steps, waiting requests are prefilled together and join the batch; a sequence that meets its
end (end-of-sequence token, a stop string, its token limit, the context) leaves at once and its request hears so,
whatever the other rows are doing. Each row samples with its own settings (`sampling.py`).

Requests come from any thread through `submit`; what happens to them goes back through the `emit` callback each
request carries (Delta, Finished, Failed), from the engine thread.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from .batch_cache import BatchState, mergeable
from .detokenize import IncrementalText
from .prompts import PreparedPrompt
from .sampling import SamplingParams, next_tokens

log = logging.getLogger("spatial_mllm.serving")


@dataclass(frozen=True)
class Delta:
    index: int  # choice index
    text: str


@dataclass(frozen=True)
class Finished:
    index: int
    reason: str  # "stop" | "length"
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Finished | Failed


class QueueFull(Exception):
    """More requests are waiting than the engine was told to hold."""


@dataclass(eq=False)
class GenerationRequest:
    prompt: PreparedPrompt
    params: SamplingParams
    emit: Callable[[Event], None]
    n: int = 1
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    index: int
    text: IncrementalText
    generator: torch.Generator | None
    last_token: int = -1
    generated: int = 0
    done: bool = False


class Engine:
    def __init__(self, model, processor, max_batch_size: int = 16, max_queue: int = 64, max_model_len: int = 2048):
        self.model = model
        self.tokenizer = processor.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        eos = model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        # What the model's generation config suppresses, and always <image>: a placeholder for pixels, never text.
        # Ids past the output head (an imported release's <image>) cannot be emitted and have no logit to mask.
        vocabulary = model.get_output_embeddings().weight.shape[0]
        self.suppressed = sorted(
            token for token in {*(model.generation_config.suppress_tokens or []), processor.image_token_id}
            if token < vocabulary
        )
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._running: list[Sequence] = []
        self._state: BatchState | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run; the tests read it to see that work stops

    # --- called from other threads --------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="spatial-mllm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest) -> None:
        if request.n > self.max_batch_size:
            raise ValueError(f"n={request.n} is more than the batch holds ({self.max_batch_size})")
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._wake.notify()

    # --- the engine thread ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            if admitted:
                try:
                    self._prefill(admitted)
                except Exception as err:  # only the newcomers fail, unless the batch's cache was left half-joined
                    log.exception("prefill failed")
                    message = f"generation failed: {type(err).__name__}: {err}"
                    if self._state is not None and self._state.rows != len(self._running):
                        self._fail_all(message)
                    else:
                        self._fail_requests(admitted, message)
            try:
                self._drop_cancelled()
                if self._running:
                    self._decode_step()
            except Exception as err:  # a bug or an out-of-memory: everyone in flight hears it, the engine goes on
                log.exception("generation failed")
                self._fail_all(f"generation failed: {type(err).__name__}: {err}")
        self._fail_all("the server is shutting down")

    def _admit(self) -> list[GenerationRequest]:
        """Requests to prefill now, first come first served, as many as the batch has room for (called locked)."""
        if any(r.cancelled.is_set() for r in self._waiting):  # clients that left while queued free their slots
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled.is_set())
        if self._running and self._state is not None and not mergeable(self._state.cache):
            return []  # this model's cache cannot take rows mid-flight: new requests wait for an empty batch
        free = self.max_batch_size - len(self._running)
        admitted = []
        while self._waiting and self._waiting[0].n <= free:
            request = self._waiting.popleft()
            admitted.append(request)
            free -= request.n
        return admitted

    def _forward(self, input_ids, state: BatchState, position_ids, pixel_values=None) -> torch.Tensor:
        output = self.model(
            input_ids=input_ids,
            attention_mask=state.attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            cache=state.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1]

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        device = self.model.device
        width = max(len(r.prompt.input_ids) for r in requests)
        ids = [[self.pad_id] * (width - len(r.prompt.input_ids)) + r.prompt.input_ids for r in requests]
        mask = [[0] * (width - len(r.prompt.input_ids)) + [1] * len(r.prompt.input_ids) for r in requests]
        pixels = [r.prompt.pixel_values for r in requests if r.prompt.pixel_values is not None]
        pixel_values = torch.cat(pixels).to(device=device, dtype=self.model.dtype) if pixels else None
        state = BatchState(DynamicCache(config=self.model.config), torch.tensor(mask, device=device))
        positions = (state.attention_mask.cumsum(-1) - 1).masked_fill(state.attention_mask == 0, 1)
        logits = self._forward(torch.tensor(ids, device=device), state, positions, pixel_values)
        # A request with n choices is prefilled once and its row copied n times.
        copies = [row for row, r in enumerate(requests) for _ in range(r.n)]
        if len(copies) != len(requests):
            state.select(copies)
            logits = logits[torch.tensor(copies, device=logits.device)]
        sequences = [
            Sequence(r, i, IncrementalText(self.tokenizer, r.params.stop), r.params.generator(i))
            for r in requests
            for i in range(r.n)
        ]
        if self._state is None or not self._running:
            self._state, self._running = state, sequences
        else:
            self._state.join(state)
            self._running.extend(sequences)
        self._advance(logits, first=len(self._running) - len(sequences))

    def _decode_step(self) -> None:
        state = self._state
        device = state.attention_mask.device
        input_ids = torch.tensor([[s.last_token] for s in self._running], device=device)
        positions = state.positions_of_next()
        state.extend()
        logits = self._forward(input_ids, state, positions)
        self.steps += 1
        self._advance(logits)

    def _advance(self, logits: torch.Tensor, first: int = 0) -> None:
        """Sample a token for rows first.. (those `logits` belong to), emit text, retire finished rows."""
        rows = self._running[first:]
        logits[:, self.suppressed] = float("-inf")
        tokens = next_tokens(logits, [s.request.params for s in rows], [s.generator for s in rows])
        for sequence, token in zip(rows, tokens):
            self._take(sequence, token)
        self._retire()

    def _retire(self) -> None:
        """Rows that are done leave the batch now; the others keep their cache."""
        keep = [row for row, s in enumerate(self._running) if not s.done]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[row] for row in keep]
        if self._running:
            self._state.select(keep)
        else:
            self._state = None

    def _take(self, sequence: Sequence, token: int) -> None:
        request = sequence.request
        sequence.last_token = token
        sequence.generated += 1
        if token in self.eos_ids and not request.params.ignore_eos:
            self._finish(sequence, "stop")
            return
        piece = sequence.text.add(token)
        if piece:
            request.emit(Delta(sequence.index, piece))
        if sequence.text.stopped:
            self._finish(sequence, "stop")
        elif sequence.generated >= request.params.max_new_tokens:
            self._finish(sequence, "length")
        elif len(request.prompt.input_ids) + sequence.generated >= self.max_model_len:
            self._finish(sequence, "length")

    def _finish(self, sequence: Sequence, reason: str) -> None:
        rest = sequence.text.flush()
        if rest:
            sequence.request.emit(Delta(sequence.index, rest))
        sequence.request.emit(Finished(sequence.index, reason, sequence.generated))
        sequence.done = True

    def _drop_cancelled(self) -> None:
        for sequence in self._running:
            if sequence.request.cancelled.is_set():
                sequence.done = True
        self._retire()

    def _fail_requests(self, requests: list[GenerationRequest], message: str) -> None:
        for request in requests:
            request.emit(Failed(message))
        failed = {id(r) for r in requests}
        for sequence in self._running:
            if id(sequence.request) in failed:
                sequence.done = True
        self._retire()

    def _fail_all(self, message: str) -> None:
        with self._wake:
            waiting = list(self._waiting) if self._stopping else []
            if self._stopping:
                self._waiting.clear()
        requests = list({id(s.request): s.request for s in self._running}.values()) + waiting
        for request in requests:
            request.emit(Failed(message))
        self._running, self._state = [], None


__all__ = ["Delta", "Engine", "Event", "Failed", "Finished", "GenerationRequest", "QueueFull"]
