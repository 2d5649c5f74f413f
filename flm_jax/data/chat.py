"""Chat data for supervised fine-tuning: Tele-FLM's chat template, per-token loss weights, strict reading of chat
JSONL files, and the feature converter that carries the weights through packing.

A record is one JSON line {"messages": [{"role": "user" | "assistant" | "system", "content": str}, ...]} (other
keys are ignored). The template renders a conversation as

    BOS <_user> u1 <_bot> a1 EOS <_user> u2 <_bot> a2 EOS ...

(system messages are dropped) with loss weight 1 on the answer tokens and their EOS, 0 on everything else (BOS,
markers, user text). The rendered ids equal the chat tokenizer's encoding of the template string
'<_user>u1<_bot>a1' with EOS ids appended after each answer. BOS is the packer's: the task's 'targets' are the
ids after BOS, and the packed row's 'inputs' start the segment with BOS exactly as for a pretraining document.

Reading is strict: a malformed record is a ChatFormatError naming the file and line, unless the task skips
malformed records, which are then counted per reason and reported (never a silent drop). A record that does not
fit the sequence length (len(ids) - 1 > seq_len) is malformed too: chat records are never split or truncated.
Files are read and tokenized in Python when a dataset is built (cached while the files do not change).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

# isort: split  (TensorFlow's settings in flm_jax.data._tf apply before seqio / tfds import it)
import seqio  # noqa: E402  (after _tf)

from flm_jax.config import ConfigError
from flm_jax.data._tf import plain_graph_fn, tf
from flm_jax.data.corpus import ASSETS_DIR
from flm_jax.data.vocab import (
    BOS_ID,
    BOT_ID,
    CHAT_MARKERS,
    EOS_ID,
    USER_ID,
    get_chat_vocabulary,
    load_chat_sentencepiece,
)

log = logging.getLogger(__name__)

ROLES = ("user", "assistant", "system")
WEIGHTS_KEY = "loss_weights"  # the task feature holding the per-target loss weights (0 or 1)
INSTRUCTIONS_DIR = os.path.join(ASSETS_DIR, "instructions")
INSTRUCTIONS_TASK = "flm_instructions"
INSTRUCTIONS_FILES = {split: os.path.join(INSTRUCTIONS_DIR, f"{split}.jsonl") for split in ("train", "validation")}
# Why a record is malformed; the keys of the counts that skipped_records() and the read reports give.
REASONS = (
    "bad_json",  # the line is not valid JSON
    "bad_messages",  # not an object with a list 'messages' of objects
    "missing_role",
    "unknown_role",  # a role other than user, assistant, system
    "bad_content",  # 'content' missing or not a string
    "marker_in_content",  # a text holding '<_user>' or '<_bot>' (it would tokenize as a template marker)
    "no_assistant",  # nothing to learn from
    "bad_order",  # user and assistant turns must alternate, starting with user and ending with assistant
    "too_long",  # more than seq_len ids after BOS
)
FilePatterns = str | Sequence[str]


class ChatFormatError(ConfigError):
    """A malformed chat record; the message names the file, the line, the reason and the fix."""

    def __init__(self, path: str, line: int, reason: str, detail: str):
        self.path, self.line, self.reason, self.detail = path, line, reason, detail
        super().__init__(
            f"{path}:{line}: {reason}: {detail} (fix the record, or register the task with skip_malformed=True "
            "to skip and count such records)"
        )


def _fresh(e: ChatFormatError) -> ChatFormatError:
    """A new instance to raise (the cached reads keep theirs free of tracebacks)."""
    return ChatFormatError(e.path, e.line, e.reason, e.detail)


class _Malformed(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class Message(NamedTuple):
    role: str
    content: str


class RenderedChat(NamedTuple):
    ids: list[int]  # BOS, then the conversation in the template
    weights: list[int]  # per id: 1 on answer tokens and their EOS, else 0 (BOS, markers, user text)

    @property
    def targets(self) -> list[int]:
        """What a packed row holds as targets (BOS is the packer's input)."""
        return self.ids[1:]

    @property
    def target_weights(self) -> list[int]:
        return self.weights[1:]


class ChatRecord(NamedTuple):
    path: str
    line: int  # 1-based line of the file
    targets: np.ndarray  # int32, the rendered ids after BOS
    weights: np.ndarray  # int32, 0 / 1 per target
    answer_bytes: int  # UTF-8 bytes of the assistant texts (what bits per byte divides by)


class ChatRead(NamedTuple):
    records: tuple[ChatRecord, ...]
    errors: tuple[ChatFormatError, ...]  # every malformed line, in file order


def parse_messages(record: Any) -> list[Message]:
    """The validated messages of one decoded record (see REASONS); raises _Malformed."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _Malformed("bad_messages", 'expected {"messages": [{"role": ..., "content": ...}, ...]}')
    out = []
    for i, m in enumerate(messages, 1):
        if "role" not in m:
            raise _Malformed("missing_role", f"message {i} has no 'role'")
        if m["role"] not in ROLES:
            raise _Malformed("unknown_role", f"message {i} has role {m['role']!r}; expected one of {ROLES}")
        content = m.get("content")
        if not isinstance(content, str):
            raise _Malformed("bad_content", f"message {i} ({m['role']}) needs a string 'content', got {content!r:.40}")
        for marker in CHAT_MARKERS:
            if marker in content:
                raise _Malformed("marker_in_content", f"message {i} ({m['role']}) contains the marker {marker!r}")
        out.append(Message(m["role"], content))
    turns = [m.role for m in out if m.role != "system"]
    if "assistant" not in turns:
        raise _Malformed("no_assistant", "the conversation has no assistant turn")
    for i, role in enumerate(turns):
        want = ("user", "assistant")[i % 2]
        if role != want:
            raise _Malformed("bad_order", f"turn {i + 1} (system messages aside) is {role}, expected {want}")
    if turns[-1] != "assistant":
        raise _Malformed("bad_order", "the conversation ends with a user turn that has no answer")
    return out


def parse_chat_line(line: bytes | str, path: str, number: int) -> list[Message]:
    """The validated messages of one JSONL line; a ChatFormatError names the file, the line and the reason."""
    try:
        try:
            record = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
        except UnicodeDecodeError as e:
            raise _Malformed("bad_json", f"not UTF-8 ({e})") from None
        except json.JSONDecodeError as e:
            raise _Malformed("bad_json", f"not valid JSON ({e})") from None
        return parse_messages(record)
    except _Malformed as e:
        raise ChatFormatError(path, number, e.reason, e.detail) from None


def _encode(sp, text: str) -> list[int]:
    return sp.encode(text) if text else []


def render_chat(messages: Sequence[Mapping[str, str] | Message], sp=None) -> RenderedChat:
    """Renders validated messages with the template: BOS, then per user turn '<_user>' text '<_bot>' (weight 0),
    per assistant turn its text and EOS (weight 1); system messages are dropped. `sp`: the chat tokenizer."""
    sp = sp or _chat_sp()
    ids, weights = [BOS_ID], [0]
    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, Message) else (m["role"], m["content"])
        if role == "user":
            part, w = [USER_ID, *_encode(sp, content), BOT_ID], 0
        elif role == "assistant":
            part, w = [*_encode(sp, content), EOS_ID], 1
        elif role == "system":
            continue
        else:
            raise ValueError(f"unknown role {role!r}")
        ids += part
        weights += [w] * len(part)
    return RenderedChat(ids, weights)


@functools.cache
def _chat_sp():
    return load_chat_sentencepiece()


def _read_file(path: str) -> tuple[list[ChatRecord], list[ChatFormatError]]:
    sp = _chat_sp()
    records, errors = [], []
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read()
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():  # blank lines (and the end of the file) are not records
            continue
        try:
            messages = parse_chat_line(line, path, number)
        except ChatFormatError as e:
            errors.append(e)
            continue
        rendered = render_chat(messages, sp)
        answer_bytes = sum(len(m.content.encode("utf-8")) for m in messages if m.role == "assistant")
        records.append(
            ChatRecord(
                path,
                number,
                np.asarray(rendered.targets, np.int32),
                np.asarray(rendered.target_weights, np.int32),
                answer_bytes,
            )
        )
    return records, errors


@functools.lru_cache(maxsize=16)
def _read_files(files_and_stats: tuple[tuple[str, int, int], ...]) -> ChatRead:
    records, errors = [], []
    for path, _, _ in files_and_stats:
        r, e = _read_file(path)
        records += r
        errors += e
    return ChatRead(tuple(records), tuple(errors))


def glob_files(patterns: FilePatterns) -> list[str]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not files:
        raise FileNotFoundError(f"no chat files match {patterns}")
    return files


def read_chat_files(patterns: FilePatterns) -> ChatRead:
    """Every record and every malformed line of the sorted, globbed files (cached while the files are unchanged)."""
    stats = []
    for path in glob_files(patterns):
        st = tf.io.gfile.stat(path)
        stats.append((path, int(st.mtime_nsec), int(st.length)))
    return _read_files(tuple(stats))


def _too_long(record: ChatRecord, seq_len: int | None) -> ChatFormatError | None:
    if seq_len is None or len(record.targets) <= seq_len:
        return None
    detail = f"{len(record.targets)} ids after BOS do not fit the sequence length {seq_len} (never truncated)"
    return ChatFormatError(record.path, record.line, "too_long", detail)


class ChatSource:
    """The chat files of a task per split, read strictly or skipping (and counting) malformed records."""

    def __init__(self, name: str, split_to_filepattern: Mapping[str, FilePatterns], skip_malformed: bool):
        self.name, self.skip_malformed = name, bool(skip_malformed)
        self.split_to_filepattern = dict(split_to_filepattern)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.split_to_filepattern)

    def read(self, split: str) -> ChatRead:
        if split not in self.split_to_filepattern:
            raise ValueError(f"chat task {self.name!r} has no split {split!r}; it has {self.splits}")
        return read_chat_files(self.split_to_filepattern[split])

    def check(self, split: str, seq_len: int | None = None) -> tuple[list[ChatRecord], dict[str, int]]:
        """(records that go into batches, skipped count per reason). Strict: the first malformed record (file
        order) raises its ChatFormatError; skipping: counts every malformed record, too long ones included."""
        read = self.read(split)
        errors = list(read.errors)
        kept = []
        for record in read.records:
            err = _too_long(record, seq_len)
            if err is None:
                kept.append(record)
            else:
                errors.append(err)
        if errors and not self.skip_malformed:
            raise _fresh(min(errors, key=lambda e: (e.path, e.line)))
        counts = collections.Counter(e.reason for e in errors)
        return kept, {reason: counts[reason] for reason in REASONS if counts[reason]}

    def report(self, split: str, seq_len: int | None) -> dict[str, int]:
        """check(), logging the skipped counts (a warning, once per call) when there are any."""
        kept, skipped = self.check(split, seq_len)
        if skipped:
            log.warning(
                "chat task %r split %r: skipped %d malformed records %s, kept %d",
                self.name,
                split,
                sum(skipped.values()),
                skipped,
                len(kept),
            )
        return skipped

    def dataset_fn(self, split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        """{'targets', 'loss_weights'} per record in file order (shuffled whole, redrawn each epoch, when asked).
        Strict: a malformed line raises here. Too long records are left to `fit_sequence_length` (which knows
        the length)."""
        read = self.read(split)
        if read.errors and not self.skip_malformed:
            raise _fresh(read.errors[0])
        records = read.records
        lengths = np.asarray([len(r.targets) for r in records], np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        targets = tf.constant(np.concatenate([r.targets for r in records] or [np.zeros(0, np.int32)]))
        weights = tf.constant(np.concatenate([r.weights for r in records] or [np.zeros(0, np.int32)]))
        starts_t, lengths_t = tf.constant(starts), tf.constant(lengths)
        ds = tf.data.Dataset.range(len(records))
        if shuffle_files:
            ds = ds.shuffle(max(len(records), 1), seed=seed, reshuffle_each_iteration=True)

        def row(i):
            s, n = starts_t[i], lengths_t[i]
            return {"targets": targets[s : s + n], WEIGHTS_KEY: weights[s : s + n]}

        return ds.map(plain_graph_fn(row), num_parallel_calls=tf.data.AUTOTUNE)

    def text_stats(self, split: str, seq_len: int | None = None) -> tuple[int, int]:
        """(records that go into batches, UTF-8 bytes of their assistant texts)."""
        kept, _ = self.check(split, seq_len)
        return len(kept), sum(r.answer_bytes for r in kept)


def fit_sequence_length(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None = None, *, skip_malformed: bool = False
) -> tf.data.Dataset:
    """The in-graph guard against truncation: records longer than sequence_length['targets'] are dropped when
    skipping (already counted by ChatSource.check) and fail the pipeline otherwise (seqio would trim them)."""
    length = (sequence_length or {}).get("targets")
    if not length:
        return dataset
    if skip_malformed:
        return dataset.filter(plain_graph_fn(lambda ex: tf.size(ex["targets"]) <= length))

    def check(ex):
        n = tf.size(ex["targets"])
        msg = f"a chat record is longer than the sequence length {length}; read it through flm_jax.data for its line"
        with tf.control_dependencies([tf.debugging.assert_less_equal(n, length, message=msg)]):
            return {k: tf.identity(v) for k, v in ex.items()}

    return dataset.map(plain_graph_fn(check), num_parallel_calls=tf.data.AUTOTUNE)


@functools.cache
def output_features() -> dict[str, seqio.Feature]:
    """'targets' (chat tokenizer ids, EOS already in place) and 'loss_weights' (0 / 1 per target)."""
    return {
        "targets": seqio.Feature(vocabulary=get_chat_vocabulary(), add_eos=False, dtype=tf.int32, rank=1),
        WEIGHTS_KEY: seqio.Feature(
            vocabulary=seqio.PassThroughVocabulary(size=2), add_eos=False, dtype=tf.int32, rank=1
        ),
    }


def is_chat_provider(provider: seqio.DatasetProviderBase) -> bool:
    """Whether a task or mixture yields chat features (so it packs with ChatFeatureConverter)."""
    return WEIGHTS_KEY in provider.output_features


def feature_lengths(seq_len: int) -> dict[str, int]:
    return {"targets": seq_len, WEIGHTS_KEY: seq_len}


class ChatFeatureConverter(seqio.LMFeatureConverter):
    """LMFeatureConverter whose decoder_loss_weights are the task's 'loss_weights' instead of 1 on every target.

    Packing (seqio.utils.trim_and_pack_dataset) packs 'targets' and 'loss_weights' side by side: both have the
    same length in every example, so they fill the same slots of the same row. The packer measures an example's
    feature by its non-zero entries (zeros are padding to it), so the weights travel shifted by one (1 / 2) and
    are shifted back after packing, padding becoming 0. Inputs (BOS at every segment start), segment ids and
    positions come from 'targets' exactly as for pretraining rows.
    """

    TASK_FEATURES = {
        "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        WEIGHTS_KEY: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        shift = plain_graph_fn(lambda ex: {**ex, WEIGHTS_KEY: ex[WEIGHTS_KEY] + 1})
        ds = ds.map(shift, num_parallel_calls=tf.data.AUTOTUNE)
        return super()._convert_features(ds, task_feature_lengths)

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
        weights = tf.maximum(features[WEIGHTS_KEY] - 1, 0)  # back to 0 / 1; padding (0) stays 0
        return {**super()._convert_example(features), "decoder_loss_weights": weights}


_SOURCES: dict[str, ChatSource] = {}  # chat task name -> its source


def add_source(source: ChatSource) -> None:
    _SOURCES[source.name] = source


def remove_source(name: str) -> None:
    _SOURCES.pop(name, None)


def chat_source(name: str) -> ChatSource | None:
    """The ChatSource of a chat task registered by flm_jax.data, else None."""
    return _SOURCES.get(name)


def skipped_records(name: str, split: str, seq_len: int | None = None) -> dict[str, int]:
    """The malformed records that chat task `name` skips in `split` at `seq_len`, counted per reason (REASONS);
    {} when there are none. A strict task raises the first one instead."""
    source = chat_source(name)
    if source is None:
        raise KeyError(f"{name!r} is not a chat task registered by flm_jax.data")
    return source.check(split, seq_len)[1]


def check_provider(name: str, split: str, seq_len: int) -> dict[str, dict[str, int]]:
    """Before reading task or mixture `name`: every chat task in it is checked at `seq_len` (a strict one raises
    its first malformed record; a skipping one logs its counts). Returns {task: skipped counts}."""
    provider = seqio.get_mixture_or_task(name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    return {t.name: _SOURCES[t.name].report(split, seq_len) for t in tasks if t.name in _SOURCES}
