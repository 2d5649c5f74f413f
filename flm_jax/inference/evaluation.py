"""Evaluating a plain model outside the trainer: the library behind `python -m flm_jax.evaluate`.

  domains          loss, tokens, bytes and bits per byte of every task of a mixture's validation split (the
                   trainer's own computation, flm_jax/training/evaluation.py), and their total
  files            the same for text or JSONL files (each file, or each JSONL line's "text", is one document)
  multiple_choice  log-likelihood scoring of local JSONL questions {"question", "choices", "answer"} (answer: the
                   index of the right choice, or its text): accuracy, and accuracy_norm where each choice's
                   log-likelihood is divided by its UTF-8 length
  exact_match      a chat model's greedy answers to held-out conversations (chat JSONL, default: the shipped
                   instruction set's validation split) against the reference answers, character for character
BPB is the summed token NLL in nats / (ln 2 x UTF-8 bytes of the text).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import sentencepiece as spm

from flm_jax import data
from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.inference.generate import generate
from flm_jax.inference.scoring import score_continuations, with_bos
from flm_jax.params import param_shardings
from flm_jax.partitioning import MeshLayout, batch_sharding, batch_split, make_mesh, replicated
from flm_jax.training.evaluation import host_validation_set, score_sets
from flm_jax.training.step import make_eval_step

import seqio  # isort: skip  (after flm_jax.data, which sets TensorFlow up)


def tasks_of(name: str) -> list[str]:
    """The tasks of a registered seqio mixture (or the task itself)."""
    found = data.tasks.task_or_mixture(name)
    return [task.name for task in found.tasks] if isinstance(found, seqio.Mixture) else [name]


def register_file(path: str | Path) -> str:
    """A seqio task whose validation split is one text or JSONL file; returns its name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--text_file {path} does not exist")
    name = f"file_{zlib.crc32(str(path.resolve()).encode()):08x}"
    if path.suffix == ".jsonl":
        return data.register_jsonl_task(name, {"validation": str(path)})
    return data.register_text_task(name, {"validation": str(path)}, document_per="file")


def choice_items(path: str | Path) -> list[tuple[str, list[str], int]]:
    """(question, choices, index of the answer) of each line of a multiple-choice JSONL file."""
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            question, choices, answer = record["question"], list(record["choices"]), record["answer"]
            index = choices.index(answer) if isinstance(answer, str) else int(answer)
            if not 0 <= index < len(choices):
                raise ValueError(f"answer {answer!r} is not one of the {len(choices)} choices")
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{path}:{number}: not a multiple-choice record {{question, choices, answer}}: {e}"
            ) from None
        items.append((question, choices, index))
    return items


def multiple_choice(
    params, config: TeleFLMConfig, sp: spm.SentencePieceProcessor, path: str | Path, batch_size: int = 8
) -> dict[str, float]:
    """Accuracy of picking the most likely choice (a choice follows its question after one space)."""
    items = choice_items(path)
    requests = [(with_bos(sp.encode(q), config), sp.encode(" " + c)) for q, choices, _ in items for c in choices]
    scores = iter(score_continuations(params, config, requests, batch_size))
    right = right_norm = 0
    for _, choices, answer in items:
        logprobs = [next(scores).logprob for _ in choices]
        per_byte = [lp / len((" " + c).encode("utf-8")) for lp, c in zip(logprobs, choices)]
        right += max(range(len(choices)), key=logprobs.__getitem__) == answer
        right_norm += max(range(len(choices)), key=per_byte.__getitem__) == answer
    return {"accuracy": right / len(items), "accuracy_norm": right_norm / len(items), "count": len(items)}


def chat_records(path: str | Path) -> list[list[data.chat.Message]]:
    """The conversations of a chat JSONL file; a malformed line is a ChatFormatError naming it."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [data.parse_chat_line(line, str(path), number) for number, line in enumerate(lines, start=1) if line.strip()]


def check_chat_model(config: TeleFLMConfig) -> None:
    if config.vocab_size < data.CHAT_VOCAB_SIZE:
        raise ConfigError(
            f"exact-match scoring of chat data needs a model with the chat tokenizer's vocabulary "
            f"(vocab_size >= {data.CHAT_VOCAB_SIZE}, a fine-tuned model); this one has {config.vocab_size}."
        )


def check_inputs(
    config: TeleFLMConfig,
    layout: MeshLayout,
    mixture: str,
    text_files: Sequence[str],
    choice_files: Sequence[str],
    chat_files: Sequence[str],
    batch_size: int,
) -> None:
    """Raise, before any work, for an input that evaluate() cannot use: an unknown mixture, a missing or malformed
    file, chat files for a model without the chat vocabulary, a batch that the mesh cannot split."""
    tasks_of(mixture)
    for flag, files in (("--text_file", text_files), ("--choices_file", choice_files), ("--chat_file", chat_files)):
        for path in files:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path} does not exist.")
    for path in choice_files:
        choice_items(path)
    for path in chat_files:
        chat_records(path)
    if chat_files:
        check_chat_model(config)
    split = batch_split(make_mesh(layout), layout)
    if batch_size % split:
        raise ConfigError(
            f"batch_size={batch_size} is not a multiple of the mesh's batch split ({split}, MeshLayout "
            f"{layout.name!r}); pass a multiple of {split} (--batch_size) or a mesh with fewer batch shards."
        )


def exact_match(params, config: TeleFLMConfig, path: str | Path, max_new_tokens: int = 48) -> dict[str, Any]:
    """Accuracy of greedy answers to the last user turn of each chat record (the conversation before it, earlier
    answers included, is the prompt), decoded in one batch with the KV cache."""
    check_chat_model(config)
    sp = spm.SentencePieceProcessor(model_file=data.CHAT_TOKENIZER_PATH)
    prompts, references = [], []
    for messages in chat_records(path):
        prompts.append(data.render_chat(messages[:-1], sp).ids)
        references.append(messages[-1].content)
    new = generate(params, config, prompts, max_new_tokens, eos_id=config.eos_token_id)
    answers = [
        sp.decode(row[: row.index(config.eos_token_id)] if config.eos_token_id in row else row) for row in new.tolist()
    ]
    right = sum(a == r for a, r in zip(answers, references))
    examples = [{"reference": r, "answer": a} for a, r in list(zip(answers, references))[:5]]
    return {"accuracy": right / len(references), "count": len(references), "examples": examples}


def evaluate(
    config: TeleFLMConfig,
    params: Any,
    layout: MeshLayout,
    *,
    mixture: str = "flm_default",
    text_files: Sequence[str] = (),
    choice_files: Sequence[str] = (),
    chat_files: Sequence[str] = (),
    batch_size: int = 16,
    seq_len: int = 256,
    tokenizer: str | Path | None = None,
) -> dict[str, Any]:
    """The evaluate JSON (see the module docstring) of a plain model's parameters (numpy or device arrays)."""
    check_inputs(config, layout, mixture, text_files, choice_files, chat_files, batch_size)
    seq_len = min(seq_len, config.max_position_embeddings)
    mesh = make_mesh(layout)
    shardings = param_shardings(config, mesh, layout)
    params = jax.device_put(params, shardings)
    sharding = batch_sharding(mesh, layout)
    eval_step = jax.jit(make_eval_step(config, layout), in_shardings=(shardings, sharding, replicated(mesh)))
    result: dict[str, Any] = {"mixture": mixture, "seq_len": seq_len}
    with jax.set_mesh(mesh), nn.logical_axis_rules(layout.flax_rules()):
        sets = {task: host_validation_set(task, batch_size, seq_len, sharding) for task in tasks_of(mixture)}
        domains, total = score_sets(eval_step, params, sets, sharding)
        result["domains"] = {name: score._asdict() for name, score in domains.items()}
        result["total"] = total._asdict()
        if text_files:
            files = {str(f): host_validation_set(register_file(f), batch_size, seq_len, sharding) for f in text_files}
            result["files"] = {
                name: s._asdict() for name, s in score_sets(eval_step, params, files, sharding)[0].items()
            }
    if choice_files:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer or data.TOKENIZER_PATH))
        result["multiple_choice"] = {str(f): multiple_choice(params, config, sp, f) for f in choice_files}
    if chat_files:
        result["exact_match"] = {str(f): exact_match(params, config, f) for f in chat_files}
    return result
