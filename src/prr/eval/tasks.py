"""Offline long-context tasks (RULER-style), generated from a seed and fitted to a token length.

Every task is a chat prompt: a haystack of real text (Python's ``pydoc_data.topics``) or the classic noise
sentences, with needles inserted at seeded depths, then a question. Lengths are fitted by a binary search on
the number of haystack sentences (as RULER does), then on the words of the next one, to within 2% of the target.
Scoring is string match: the share of expected answers that appear in the model's output.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..model.prompts import pydoc_text
from ..model.tokenizer import Tokenizer

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
WORDS = (
    "apple river stone cloud garden mirror candle forest window silver pepper rocket violin meadow harbor "
    "lantern pencil marble castle tiger orange planet shadow thunder bridge island feather rabbit coffee "
    "anchor basket desert dragon falcon glacier hammer jacket kettle ladder magnet needle oyster parrot "
    "quartz saddle tunnel umbrella valley walnut yogurt zebra bamboo cactus dolphin engine fossil goblet "
    "helmet igloo jungle kayak lemon mango nectar orchid pillow quiver ribbon sponge tulip velvet wagon "
    "breeze copper daisy ember frost granite honey ivory jasmine kernel lotus maple"
).split()
TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words")
HAYSTACKS = ("pydoc", "noise")


@dataclass
class TaskInstance:
    task: str
    ids: list[int]  # the chat prompt's token ids
    answers: list[str]  # every expected answer string
    max_new_tokens: int
    meta: dict = field(default_factory=dict)

    def score(self, output: str) -> float:
        """Share of expected answers found in `output` (RULER's string-match metric)."""
        return sum(a in output for a in self.answers) / len(self.answers)


def _sentences(haystack: str) -> list[str]:
    if haystack == "noise":
        return [NOISE] * 4000
    text = re.sub(r"\s+", " ", pydoc_text())
    return [s + " " for s in re.split(r"(?<=[.!?]) ", text) if s]


def _fit(build: Callable[[list[str]], list[int]], hay: list[str], target: int) -> tuple[list[int], int]:
    """The longest haystack prefix whose prompt has at most `target` tokens: whole sentences by binary search
    (as RULER does), then words of the next sentence, so long sentences cannot leave a gap of more than a word."""

    def largest(n_max: int, make) -> int:
        lo, hi = 0, n_max
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(build(make(mid))) <= target:
                lo = mid
            else:
                hi = mid - 1
        return lo

    n = largest(len(hay), lambda k: hay[:k])
    words = hay[n].split(" ") if n < len(hay) else []
    w = largest(len(words), lambda k: [*hay[:n], " ".join(words[:k]) + " "])
    parts = [*hay[:n], " ".join(words[:w]) + " "] if w else hay[:n]
    return build(parts), n


def _insert(sentences: list[str], needles: list[str], depths: list[float]) -> str:
    out = list(sentences)
    for needle, depth in sorted(zip(needles, depths, strict=True), key=lambda x: -x[1]):
        out.insert(round(depth * len(out)), needle + " ")
    return "".join(out)


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def make_task(tok: Tokenizer, task: str, target_tokens: int, seed: int = 0, haystack: str = "pydoc") -> TaskInstance:
    """One instance of `task` with a prompt of about `target_tokens` tokens (within 2%)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; expected one of {', '.join(HAYSTACKS)}")
    rng = random.Random(f"{task}/{seed}/{target_tokens}")
    pool = _sentences(haystack)
    start = rng.randrange(0, max(1, len(pool) // 2))
    hay = pool[start:] + pool[:start]
    words = list(WORDS)
    rng.shuffle(words)
    new_tokens = 24
    meta: dict = {}
    if task == "passkey":
        key = _number(rng, 5)
        needles = [f"The pass key is {key}. Remember it."]
        question, answers = "What is the pass key? Answer with the number only.", [key]
    elif task in ("niah_single", "niah_multikey", "niah_multivalue"):
        key = words.pop()
        if task == "niah_multivalue":
            values = [_number(rng) for _ in range(4)]
            needles = [f"One of the special magic numbers for {key} is: {v}." for v in values]
            answers, new_tokens = values, 48
            question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        else:
            value = _number(rng)
            needles = [f"One of the special magic numbers for {key} is: {value}."]
            if task == "niah_multikey":  # distractor needles: other keys, other numbers
                needles += [f"One of the special magic numbers for {words.pop()} is: {_number(rng)}." for _ in range(3)]
            answers = [value]
            question = f"What is the special magic number for {key} mentioned in the provided text?"
    elif task == "variable_tracking":
        value = _number(rng, 5)
        names = [f"V{rng.randint(100, 999)}{c}" for c in "ABCDE"]
        needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(4)]
        answers = names
        question = f"Find all variables that are assigned the value {value} in the text above."
        meta["hops"] = 4
    else:  # common words: 10 words repeated 6 times among single-use ones
        common, rare = words[:10], words[10:]
        items = common * 6 + rare
        rng.shuffle(items)
        needles = [" ".join(f"{i + 1}. {w}" for i, w in enumerate(items)) + "."]
        answers, new_tokens = common, 48
        question = "What are the 10 most common words in the numbered list above?"
    depths = sorted(rng.uniform(0.1, 0.9) for _ in needles)

    def build(parts: list[str]) -> list[int]:
        return tok.chat([{"role": "user", "content": _insert(parts, needles, depths) + "\n\n" + question}])

    ids, n = _fit(build, hay, target_tokens)
    if abs(len(ids) - target_tokens) > 0.02 * target_tokens:
        raise ValueError(f"{task}: cannot fit {target_tokens} tokens (got {len(ids)}); the haystack is too short "
                         f"or the needles too long")
    meta.update(sentences=n, depths=[round(d, 3) for d in depths])
    return TaskInstance(task, ids, answers, new_tokens, meta)
