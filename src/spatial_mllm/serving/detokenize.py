"""Generated token ids -> text pieces safe to send: a piece that might still become a stop string, or an
incomplete UTF-8 character (decoded as U+FFFD), is held back until the next token settles it."""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalText:
    """Feed tokens with `add`; each call returns the text that can be sent now. `stopped` turns true when a stop
    string appears; the text is cut before it. `flush` releases what was held back once generation has ended."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._decoded()
        found = [position for position in (text.find(s, 0) for s in self.stop) if position >= 0]
        if found:
            self.stopped = True
            return self._emit(text[: max(min(found), len(self.sent))])
        safe_end = len(text.rstrip(REPLACEMENT))
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe_end = min(safe_end, len(text) - k)
                    break
        return self._emit(text[:safe_end])

    def flush(self) -> str:
        return "" if self.stopped else self._emit(self._decoded())

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece = text[len(self.sent):]
        self.sent = text
        return piece


__all__ = ["IncrementalText"]
