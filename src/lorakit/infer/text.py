"""An answer's text as its tokens arrive: deltas safe to show, and stop strings.

Tokens are decoded together (a token alone can be half a character), a trailing replacement
character waits for the rest of its bytes, and the end of the text that could still become a stop
string is held back until it cannot; when one appears, the text ends before it.
"""

from __future__ import annotations

from typing import Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.cut: str | None = None  # the text, once a stop string ended it

    @property
    def text(self) -> str:
        return self.cut if self.cut is not None else self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, bool]:
        """Take one answer token: (the new text safe to show, whether a stop string ended it)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.cut = text[:at]
                return self._delta(self.cut), True
        if text.endswith("\ufffd"):  # a multi-byte character may be half decoded: wait for the rest
            return "", False
        return self._delta(text[:len(text) - self._held(text)]), False

    def rest(self, *, complete: bool = True) -> str:
        """What is left to show at the end: all of it (a stop token, the length limit), or with
        `complete=False` (cancelled, timed out) all but what could start a stop string."""
        text = self.text
        return self._delta(text if complete or self.cut is not None else text[:len(text) - self._held(text)])

    def _held(self, text: str) -> int:
        """How many trailing characters could be the start of a stop string (held back)."""
        for k in range(min(self.hold, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0

    def _delta(self, text: str) -> str:
        if len(text) <= self.sent:
            return ""
        out, self.sent = text[self.sent:], len(text)
        return out


__all__ = ["TextStream"]
