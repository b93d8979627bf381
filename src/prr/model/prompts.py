"""Offline long prompts: real text from Python's own documentation (``pydoc_data.topics``) with a passkey
hidden at a chosen depth. No download: the text ships with every CPython."""

from __future__ import annotations

import random

from .tokenizer import Tokenizer


def pydoc_text() -> str:
    """About 470 KB of English technical prose, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def passkey_prompt(tok: Tokenizer, target_tokens: int = 6000, depth: float = 0.5, seed: int = 0,
                   chat: bool = True) -> tuple[list[int], str]:
    """A prompt of about `target_tokens` tokens hiding a 5-digit pass key at `depth` (0 = start, 1 = end) of
    real text, ending with the question. Returns (token ids, the pass key)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
    question = "What is the pass key? Answer with the number only."
    frame = tok.chat([{"role": "user", "content": "\n\n" + question}]) if chat else tok.encode(question)
    text_ids = tok.encode(pydoc_text())
    budget = max(0, target_tokens - len(frame) - len(tok.encode(needle)))
    if budget > len(text_ids):
        raise ValueError(f"target_tokens={target_tokens} is more than the bundled text holds")
    body = text_ids[:budget]
    cut = int(depth * len(body))
    document = tok.decode(body[:cut]) + needle + tok.decode(body[cut:])
    content = document + "\n\n" + question
    ids = tok.chat([{"role": "user", "content": content}]) if chat else tok.encode(content)
    return ids, key
