"""`python -m flm_jax.data.build_instructions [--check]`: writes the shipped instruction set
(assets/instructions/{train,validation}.jsonl) and the chat tokenizer (assets/chat_tokenizer.model).

The instruction set is generated from a seed, deterministically (pure Python `random.Random`, no tokenizer or
TensorFlow involved in the choice of records): short tasks whose answers can be checked exactly (arithmetic,
copying, reversing, sorting, counting, answers in a fixed format), some multi-turn, some with a system message.
Every conversation (system message aside) is unique across both splits, so validation is held out. Each line is
{"task": kind, "messages": [{"role", "content"}, ...]}; "task" names the generator (for per-kind accuracy).

`noisy_records(records, fraction, seed)` makes a corrupted copy (wrong or off-format answers) for less-is-more
experiments; it is not written to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable

from flm_jax.data import chat, vocab

SEED = 10
SPLIT_SIZES = {"train": 2000, "validation": 200}
MAX_TARGETS = 128  # every record fits seq_len 128 with the chat tokenizer (checked when writing)
SYSTEM_FRACTION = 0.2

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful assistant. Answer exactly what is asked.",
    "Answer as briefly as possible.",
    "You are a precise calculator and text tool.",
)
WORDS = (
    "apple", "river", "stone", "garden", "window", "candle", "silver", "forest", "bridge", "summer",
    "winter", "market", "planet", "rocket", "butter", "pencil", "letter", "orange", "yellow", "purple",
    "castle", "dragon", "island", "jungle", "ladder", "mirror", "needle", "pillow", "rabbit", "saddle",
    "tomato", "violin", "wallet", "zipper", "anchor", "basket", "cactus", "desert", "engine", "falcon",
    "guitar", "hammer", "insect", "jacket", "kitten", "lemon", "magnet", "nickel", "oyster", "parrot",
    "quartz", "ribbon", "spider", "tunnel", "velvet", "walnut", "cloud", "bread", "chair", "table",
    "house", "horse", "light", "music", "night", "ocean", "paper", "queen", "sugar", "tiger",
    "water", "zebra", "beach", "clock", "dance", "eagle", "flame", "grape", "heart", "juice",
    "knife", "lunch", "mouse", "north", "olive", "piano", "radio", "sheep", "train", "uncle",
    "voice", "wheel", "child", "cat", "dog", "sun", "moon", "star", "tree", "fish",
    "bird", "book", "door", "lamp", "milk", "rain", "road", "ship", "snow", "wind",
    "gold", "iron", "salt", "seed", "leaf", "bell", "coin", "drum", "frog", "king",
)  # fmt: skip
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _nums(rng: random.Random, n: int, hi: int = 99) -> list[int]:
    return [rng.randint(0, hi) for _ in range(n)]


def _add(rng):
    a, b = _nums(rng, 2)
    q = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.", "{a} + {b} = ?"))
    return [_user(q.format(a=a, b=b)), _bot(str(a + b))]


def _subtract(rng):
    a, b = _nums(rng, 2)
    q = rng.choice(("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}.", "{a} - {b} = ?"))
    return [_user(q.format(a=a, b=b)), _bot(str(a - b))]


def _random_string(rng) -> str:
    if rng.random() < 0.5:
        return "".join(rng.choice(LETTERS + "0123456789") for _ in range(rng.randint(4, 12)))
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))


def _copy(rng):
    s = _random_string(rng)
    q = rng.choice(("Copy this text exactly: {s}", "Repeat after me: {s}", "Write exactly this: {s}"))
    return [_user(q.format(s=s)), _bot(s)]


def _reverse(rng):
    w = rng.choice(WORDS)
    q = rng.choice(("Reverse the word {w}.", "Spell {w} backwards.", "Write the letters of {w} in reverse order."))
    return [_user(q.format(w=w)), _bot(w[::-1])]


def _sort(rng):
    xs = _nums(rng, rng.randint(3, 7))
    if rng.random() < 0.5:
        q, ys = "Sort these numbers from smallest to largest: {xs}", sorted(xs)
    else:
        q, ys = "Sort these numbers from largest to smallest: {xs}", sorted(xs, reverse=True)
    return [_user(q.format(xs=", ".join(map(str, xs)))), _bot(", ".join(map(str, ys)))]


def _count(rng):
    w = rng.choice(WORDS)
    q = rng.choice(
        (
            "How many letters are in the word {w}? Answer with a number.",
            "Count the letters in {w}.",
            "How long is the word {w}, in letters?",
        )
    )
    return [_user(q.format(w=w)), _bot(str(len(w)))]


def _largest(rng):
    xs = _nums(rng, rng.randint(3, 6))
    which, pick = rng.choice((("largest", max), ("smallest", min)))
    q = f"Which number is the {which}: {', '.join(map(str, xs))}? Answer with the number only."
    return [_user(q), _bot(str(pick(xs)))]


def _capitals(rng):
    if rng.random() < 0.5:
        ws = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
        where, i = rng.choice((("first", 0), ("last", -1)))
        q = f'Answer with one word in capitals: what is the {where} word of "{" ".join(ws)}"?'
        return [_user(q), _bot(ws[i].upper())]
    a, b = rng.sample(WORDS, 2)
    q = f"Answer with one word in capitals: which comes first in alphabetical order, {a} or {b}?"
    return [_user(q), _bot(min(a, b).upper())]


def _yes_no(rng):
    a, b = _nums(rng, 2)
    while a == b:
        b = rng.randint(0, 99)
    q = f"Is {a} greater than {b}? Answer yes or no."
    return [_user(q), _bot("yes" if a > b else "no")]


def _json_sum(rng):
    a, b = _nums(rng, 2)
    q = f'Give the sum of {a} and {b} as JSON with the key "sum".'
    return [_user(q), _bot(json.dumps({"sum": a + b}))]


def _follow_up_arithmetic(rng):
    a, b, c = _nums(rng, 3)
    s = a + b
    op, value = rng.choice((("Now add {c} to that.", s + c), ("Now subtract {c} from that.", s - c)))
    return [_user(f"What is {a} + {b}?"), _bot(str(s)), _user(op.format(c=c)), _bot(str(value))]


def _follow_up_word(rng):
    w = rng.choice(WORDS)
    r = w[::-1]
    then = rng.choice(("Now write it in capitals.", "Now in upper case, please.", "Write that in capital letters."))
    return [_user(f"Reverse the word {w}."), _bot(r), _user(then), _bot(r.upper())]


SINGLE_TURN: dict[str, Callable] = {
    "add": _add,
    "subtract": _subtract,
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "largest": _largest,
    "capitals": _capitals,
    "yes_no": _yes_no,
    "json_sum": _json_sum,
}
MULTI_TURN: dict[str, Callable] = {"follow_up_arithmetic": _follow_up_arithmetic, "follow_up_word": _follow_up_word}
KINDS = (*SINGLE_TURN, *MULTI_TURN, "two_questions")


def _record(rng: random.Random) -> dict:
    kind = rng.choice(KINDS)
    if kind == "two_questions":  # two unrelated single-turn tasks in one conversation
        messages = rng.choice(list(SINGLE_TURN.values()))(rng) + rng.choice(list(SINGLE_TURN.values()))(rng)
    else:
        messages = {**SINGLE_TURN, **MULTI_TURN}[kind](rng)
    if rng.random() < SYSTEM_FRACTION:
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages]
    return {"task": kind, "messages": messages}


def conversation_key(record: dict) -> str:
    """What makes a record unique: its user and assistant turns (a system message does not make it new)."""
    return json.dumps([m for m in record["messages"] if m["role"] != "system"], sort_keys=True)


def build_records(seed: int = SEED, split_sizes: dict[str, int] = SPLIT_SIZES) -> dict[str, list[dict]]:
    """{split: records}: conversations unique across all splits (by conversation_key, so validation is held out),
    drawn in split order from one generator."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = {}
    for split, n in split_sizes.items():
        records = []
        while len(records) < n:
            record = _record(rng)
            key = conversation_key(record)
            if key not in seen:
                seen.add(key)
                records.append(record)
        out[split] = records
    return out


def encode_records(records: list[dict]) -> bytes:
    """The JSONL bytes: one record per line, keys in a fixed order, UTF-8."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def instruction_files(seed: int = SEED) -> dict[str, bytes]:
    """{split: the bytes of assets/instructions/<split>.jsonl}."""
    return {split: encode_records(records) for split, records in build_records(seed).items()}


def chat_tokenizer_bytes() -> bytes:
    with open(vocab.TOKENIZER_PATH, "rb") as f:
        return vocab.build_chat_tokenizer(f.read())


def check_lengths(records: list[dict], max_targets: int = MAX_TARGETS) -> int:
    """The longest record in ids after BOS; raises if one exceeds `max_targets`."""
    sp = vocab.load_chat_sentencepiece()
    longest = 0
    for r in records:
        n = len(chat.render_chat(r["messages"], sp).targets)
        if n > max_targets:
            raise ValueError(f"record {r} has {n} ids after BOS > {max_targets}")
        longest = max(longest, n)
    return longest


_WRONG_TEXT = ("I am not sure.", "The answer is unclear.", "Let me think about it.")


def _corrupt(answer: str, rng: random.Random) -> tuple[str, str]:
    """(noise kind, a corrupted answer): a wrong value, or the right value off format."""
    if rng.random() < 0.5:
        if answer.lstrip("-").isdigit():
            wrong = str(int(answer) + rng.choice((-3, -2, -1, 1, 2, 3)))
        elif len(set(answer)) > 1:
            letters = list(answer)
            while "".join(letters) == answer:
                rng.shuffle(letters)
            wrong = "".join(letters)
        else:
            wrong = rng.choice(_WRONG_TEXT)
        return "wrong", wrong
    style = rng.choice(("chatty", "case", "punct"))
    if style == "chatty":
        return "off_format", rng.choice(("Sure! The answer is {a}.", "Of course. {a}", "Here you go: {a}")).format(
            a=answer
        )
    if style == "case" and answer.swapcase() != answer:
        return "off_format", answer.swapcase()
    return "off_format", answer + "."


def noisy_records(records: list[dict], fraction: float = 0.5, seed: int = 0) -> list[dict]:
    """A copy of `records` in which a `fraction` of the records (chosen by `seed`) have every answer corrupted:
    half wrong values (off by a little, shuffled letters), half right values off format (chatty, wrong case,
    trailing period). Corrupted records get "noise": "wrong" or "off_format" (of their last answer)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(records)), round(fraction * len(records))))
    out = []
    for i, record in enumerate(records):
        record = json.loads(json.dumps(record))  # a deep copy
        if i in chosen:
            for m in record["messages"]:
                if m["role"] == "assistant":
                    record["noise"], m["content"] = _corrupt(m["content"], rng)
        out.append(record)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="rebuild in memory and compare with the committed files")
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    files = {chat.INSTRUCTIONS_FILES[split]: raw for split, raw in instruction_files(args.seed).items()}
    files[vocab.CHAT_TOKENIZER_PATH] = chat_tokenizer_bytes()
    for split, records in build_records(args.seed).items():
        print(f"{split}: {len(records)} records, longest {check_lengths(records)} ids after BOS")
    if args.check:
        stale = []
        for path, raw in files.items():
            if not os.path.exists(path):
                stale.append(path)
            else:
                with open(path, "rb") as f:
                    if f.read() != raw:
                        stale.append(path)
        for path in stale:
            print(f"differs from a rebuild: {path}", file=sys.stderr)
        return 1 if stale else 0
    os.makedirs(chat.INSTRUCTIONS_DIR, exist_ok=True)
    for path, raw in files.items():
        with open(path, "wb") as f:
            f.write(raw)
        print(f"wrote {path} ({len(raw)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
