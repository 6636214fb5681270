"""Incremental, UTF-8-safe detokenization with stop strings.

Text is released only when it is complete (no dangling replacement character from a
partial multi-byte sequence) and cannot be the beginning of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshserve.models.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded as context so leading spaces come out right


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer | None, prompt_ids: Sequence[int], stop: Sequence[str] = ()
    ):
        self._tok = tokenizer
        context = list(prompt_ids[-_CONTEXT_TOKENS:]) if tokenizer else []
        self._ids = context
        self._prefix = 0
        self._read = len(context)
        self._text = ""  # all decoded output text (up to a stop string)
        self._emitted = 0
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids) if ids else ""

    def add(self, token_id: int) -> None:
        """Feed one generated token; sets `stopped` when a stop string completes."""
        if self._tok is None or self.stopped:
            return
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # an incomplete character: wait for the next byte
        start = len(self._text)
        self._text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        if self._stop:
            # Only a window that can contain a stop string ending in the new text.
            window = max(0, start - self._hold)
            hits = [i for s in self._stop if (i := self._text.find(s, window)) >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                self.stopped = True

    def take(self, final: bool = False) -> str:
        """Text that is safe to send now; with `final`, everything left."""
        if final and not self.stopped and self._read < len(self._ids):
            # Bytes of an unfinished character at the very end: send what decode makes.
            before = self._decode(self._ids[self._prefix : self._read])
            self._text += self._decode(self._ids[self._prefix :])[len(before) :]
            self._read = len(self._ids)
        end = len(self._text)
        if not final and not self.stopped and self._stop:
            end -= self._held_back()
        out = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        # Longest suffix of the text that is a proper prefix of some stop string.
        tail = self._text[-self._hold :] if self._hold else ""
        for n in range(len(tail), 0, -1):
            suffix = tail[-n:]
            if any(s.startswith(suffix) for s in self._stop):
                return n
        return 0
