"""Packed training batches with a checkpointable position, and validation batches for bits-per-byte.

A batch is a dict of numpy arrays shaped [batch, seq_len]:
  inputs       int32   per segment: BOS, then the targets shifted right by one
  targets      int32   per segment: the document's tokens (or one chunk of them), the last chunk ending in EOS
  segment_ids  int32   1, 2, ... for the documents packed into a row; 0 on padding
  positions    int32   0, 1, ... restarting at every segment; 0 on padding
  loss_weights float32 1 on real tokens, 0 on padding (chat tasks: 1 on answer tokens and their EOS only)
so a row reads  inputs [BOS t1 t2 t3 | BOS u1 | 0 ...] -> targets [t1 t2 t3 EOS | u1 EOS | 0 ...].
A chat task (flm_jax/data/chat.py) packs the same way, one whole conversation per segment, its loss weights
carried through packing by chat.ChatFeatureConverter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

# isort: split  (TensorFlow's settings in flm_jax.data._tf apply before seqio / tfds import it)
import seqio  # noqa: E402

from flm_jax.data import chat
from flm_jax.data import tasks as tasks_lib
from flm_jax.data._tf import autograph_off, plain_graph_fn, tf
from flm_jax.data.vocab import BOS_ID

Batch = dict[str, np.ndarray]
STATE_FORMAT = "flm_jax.data.BatchIterator/1"
_IGNORE_EXTERNAL_STATE = 1  # tf.data ExternalStatePolicy: 0 warn, 1 ignore, 2 fail


def _to_batch_format(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    segment_ids = ex["decoder_segment_ids"]
    real = tf.cast(segment_ids > 0, tf.int32)
    return {
        # seqio writes bos_id at every segment start, including the first padding slot: zero that one.
        "inputs": ex["decoder_input_tokens"] * real,
        "targets": ex["decoder_target_tokens"],
        "segment_ids": segment_ids,
        "positions": ex["decoder_positions"],
        "loss_weights": tf.cast(ex["decoder_loss_weights"], tf.float32),
    }


def packed_dataset(
    name: str,
    split: str,
    seq_len: int,
    *,
    shuffle: bool,
    num_epochs: int | None,
    seed: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
) -> tf.data.Dataset:
    """Unbatched packed rows of task or mixture `name` (see the module doc for the features). Chat tasks are
    checked first: a malformed record raises chat.ChatFormatError, or is counted and logged when skipped."""
    provider = seqio.get_mixture_or_task(name)
    is_chat = chat.is_chat_provider(provider)
    # apply_length_check=False: get_dataset trims every feature to its length and packing pads rows to it, so the
    # converter's length assertions can never fire; without them a pipeline builds ~0.1-0.2 s sooner, rows identical.
    if is_chat:
        chat.check_provider(name, split, seq_len)
        lengths = chat.feature_lengths(seq_len)
        converter = chat.ChatFeatureConverter(pack=True, bos_id=BOS_ID, apply_length_check=False)
    else:
        lengths = {"targets": seq_len}
        converter = seqio.LMFeatureConverter(pack=True, bos_id=BOS_ID, apply_length_check=False)
    shard_info = seqio.ShardInfo(index=shard_index, num_shards=num_shards) if num_shards > 1 else None
    # try_in_mem_cache=False: seqio would otherwise cache a small source after its first (shuffled) epoch.
    with autograph_off():
        ds = provider.get_dataset(
            sequence_length=lengths,
            split=split,
            shuffle=shuffle,
            seed=seed,
            num_epochs=num_epochs,
            shard_info=shard_info,
            use_cached=False,
            try_in_mem_cache=False,
        )
    ds = converter(ds, lengths)
    ds = ds.map(plain_graph_fn(_to_batch_format), num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What identifies a stream of batches; with `batches_consumed` it is the iterator's whole state."""

    name: str
    split: str = "train"
    batch_size: int = 8
    seq_len: int = 512
    seed: int = 0
    shuffle: bool = True
    repeat: bool = True
    shard_index: int = 0
    num_shards: int = 1


class BatchIterator:
    """Deterministic packed batches of a task or mixture; `state()` / `from_state()` resume at the next batch.

    `serialize()` snapshots the tf.data iterator itself (shuffle buffers, packing, prefetched batches); restoring
    it (`iterator_state=`) costs the same at any step. Without a snapshot, resuming rebuilds the stream from its
    spec and skips the consumed batches inside tf.data: exact, but its time grows with the step. A snapshot only
    restores into the dataset graph that wrote it, so a stream that skipped records its skip in its snapshots
    (`_SKIP_HEADER`) and their restore rebuilds the same graph, with the skip already done.
    One input shard of several reads every num_shards-th document of the source (the same seed in every shard,
    so the shards partition each epoch's shuffled documents).
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 512,
        seed: int = 0,
        *,
        shuffle: bool | None = None,
        repeat: bool | None = None,
        shard_index: int = 0,
        num_shards: int = 1,
        batches_consumed: int = 0,
        iterator_state: bytes | None = None,
        prefetch: int = 2,
    ):
        train = split == "train"
        self.spec = StreamSpec(
            name,
            split,
            int(batch_size),
            int(seq_len),
            int(seed),
            train if shuffle is None else bool(shuffle),
            train if repeat is None else bool(repeat),
            int(shard_index),
            int(num_shards),
        )
        if self.spec.batch_size < 1 or self.spec.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {self.spec}")
        if not 0 <= self.spec.shard_index < self.spec.num_shards:
            raise ValueError(f"shard_index must be in [0, num_shards), got {self.spec}")
        self._consumed = int(batches_consumed)
        ds = packed_dataset(
            name,
            split,
            self.spec.seq_len,
            shuffle=self.spec.shuffle,
            num_epochs=None if self.spec.repeat else 1,
            seed=self.spec.seed,
            shard_index=self.spec.shard_index,
            num_shards=self.spec.num_shards,
        )
        ds = ds.batch(self.spec.batch_size, drop_remainder=True)
        if iterator_state is None:
            self._skipped = self._consumed
        else:
            self._skipped, iterator_state = _split_skip(iterator_state)
        if self._skipped:
            ds = ds.skip(self._skipped)
        self._it = iter(ds.prefetch(prefetch))
        if iterator_state is not None:
            state = tf.io.parse_tensor(iterator_state, tf.variant)
            tf.raw_ops.DeserializeIterator(resource_handle=self._it._iterator_resource, serialized=state)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = {k: v.numpy() for k, v in next(self._it).items()}
        self._consumed += 1
        return batch

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable state; `BatchIterator.from_state(state)` continues with the next batch."""
        return {"format": STATE_FORMAT, **dataclasses.asdict(self.spec), "batches_consumed": self._consumed}

    def serialize(self) -> bytes:
        """The tf.data iterator's state, for `iterator_state=` (raises tf.errors.FailedPreconditionError for a
        source tf.data cannot checkpoint, e.g. Dataset.from_generator). py_function maps (JSONL parsing) are
        pure, so their 'external state' is ignored."""
        state = tf.raw_ops.SerializeIterator(
            resource_handle=self._it._iterator_resource, external_state_policy=_IGNORE_EXTERNAL_STATE
        )
        snapshot = tf.io.serialize_tensor(state).numpy()
        return _SKIP_HEADER + b"%d\n" % self._skipped + snapshot if self._skipped else snapshot

    @classmethod
    def from_state(cls, state: dict[str, Any], **kwargs) -> BatchIterator:
        state = dict(state)
        if state.pop("format", None) != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state: {state}")
        return cls(**state, **kwargs)


# Leads the snapshot of a stream that was resumed by skipping N batches: b"<header>N\n<serialized iterator>". A bare
# serialized tensor (a TensorProto, whose first byte is a field tag) never starts with it.
_SKIP_HEADER = b"flm_jax skipped "


def _split_skip(snapshot: bytes) -> tuple[int, bytes]:
    """(batches the snapshotted stream's graph skipped, the serialized iterator)."""
    if not snapshot.startswith(_SKIP_HEADER):
        return 0, snapshot
    count, _, rest = snapshot[len(_SKIP_HEADER) :].partition(b"\n")
    return int(count), rest


class ValidationSet(NamedTuple):
    batches: list[Batch]  # packed, unshuffled, every document exactly once; the last batches padded with 0 rows
    num_bytes: int  # UTF-8 bytes of the documents' text (chat: of the answers, the weighted text)
    num_documents: int  # (chat: conversations)
    num_tokens: int  # targets with loss weight 1 in these rows (documents' tokens + one EOS each; chat: answers)
    batch_size: int  # global rows per batch (more than each batch's rows when other processes read some shards)


def validation_set(
    name: str,
    batch_size: int,
    seq_len: int,
    split: str = "validation",
    *,
    shards: Sequence[int] = (0,),
    num_shards: int = 1,
    agree_on_count: Callable[[int], int] = int,
) -> ValidationSet:
    """Every document of task `name`'s `split` once, packed, for loss and bits-per-byte.

    With num_shards > 1 the global batch of `batch_size` rows holds batch_size // num_shards rows of each input
    shard (every num_shards-th document); this returns the rows of `shards`, side by side. Shards pack into
    different numbers of batches, so all are padded with zero rows to `agree_on_count(the most here)` batches (on
    several processes: the most over all of them). The byte and document counts are of the whole split."""
    if name not in seqio.TaskRegistry.names():
        raise ValueError(f"validation_set needs a task, not {name!r} (evaluate a mixture's tasks one by one)")
    if batch_size % num_shards:
        raise ValueError(f"batch_size {batch_size} is not a multiple of num_shards {num_shards}")
    rows = batch_size // num_shards
    per_shard = []
    for shard in shards:
        ds = packed_dataset(name, split, seq_len, shuffle=False, num_epochs=1, shard_index=shard, num_shards=num_shards)
        per_shard.append(list(ds.batch(rows, drop_remainder=False).as_numpy_iterator()))
    count = agree_on_count(max(len(b) for b in per_shard))
    empty = {k: np.zeros((0, seq_len), f.dtype.as_numpy_dtype) for k, f in ds.element_spec.items()}
    batches = []
    for i in range(count):
        parts = [b[i] if i < len(b) else empty for b in per_shard]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in empty}
        short = rows * len(shards) - len(batch["targets"])
        if short:  # zero rows go to the end; a zero row (loss weight 0, segment 0) adds nothing wherever it is
            batch = {k: np.concatenate([v, np.zeros((short, seq_len), v.dtype)]) for k, v in batch.items()}
        batches.append(batch)
    num_documents, num_bytes = tasks_lib.source_text_stats(name, split, seq_len)
    num_tokens = int(sum(b["loss_weights"].sum() for b in batches))
    return ValidationSet(batches, num_bytes, num_documents, num_tokens, batch_size)


def first_validation_batches(name: str, batch_size: int, seq_len: int, count: int, split: str = "validation"):
    """The first `count` batches of validation_set(name, batch_size, seq_len, split).batches (one input shard),
    packing only what they hold, not the whole split."""
    ds = packed_dataset(name, split, seq_len, shuffle=False, num_epochs=1)
    return list(ds.batch(batch_size).take(count).as_numpy_iterator())


def bits_per_byte(total_nll_nats: float, total_bytes: int) -> float:
    """Bits per UTF-8 byte from the summed token NLL (nats) over a text of `total_bytes` bytes."""
    if total_bytes <= 0:
        raise ValueError(f"total_bytes must be positive, got {total_bytes}")
    return float(total_nll_nats) / (math.log(2) * total_bytes)
