"""A sequence's text as its tokens arrive: deltas safe to stream, stop strings, EOS and the token limit."""

from __future__ import annotations

from ..model.generation import find_stop

FINISH = ("stop", "length")  # OpenAI's finish reasons: an EOS token or a stop string is "stop"


class TextStream:
    """Feed token ids with :meth:`add`; each returns ``(text delta, finish reason or None)``.

    Streamed text never has to be taken back: an incomplete multi-byte character and the last ``longest stop
    - 1`` characters are held until they are known not to start a stop string; the text of a finished sequence
    ends before its first stop string. Without a tokenizer (random weights) every delta is empty and only the
    token limit ends a sequence."""

    def __init__(self, tokenizer, max_tokens: int, stop: tuple[str, ...] = (), stop_at_eos: bool = True):
        self.tok, self.max_tokens, self.stop = tokenizer, max_tokens, stop
        self.eos = set(tokenizer.eos_ids) if (tokenizer is not None and stop_at_eos) else set()
        self.tokens: list[int] = []
        self.sent = ""
        self.text = ""  # the whole text once finished
        self.finish_reason: str | None = None

    def add(self, token: int) -> tuple[str, str | None]:
        if self.finish_reason is not None:
            raise RuntimeError("the sequence has finished")
        self.tokens.append(token)
        full = self.tok.decode(self.tokens) if self.tok is not None else ""
        final = None
        if self.tok is not None and (cut := find_stop(full, self.stop)) is not None:
            self.finish_reason, final = "stop", full[:cut[0]]
        elif token in self.eos:
            self.finish_reason, final = "stop", full
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason, final = "length", full
        if final is None:
            final = full.rstrip("\ufffd")
            final = final[:len(final) - max(map(len, self.stop), default=1) + 1]
        else:
            self.text = final
        if len(final) <= len(self.sent) or not final.startswith(self.sent):
            return "", self.finish_reason
        delta, self.sent = final[len(self.sent):], final
        return delta, self.finish_reason
