"""A global stream of training batches cut into input shards, of which one process reads only those it holds.

The global batch of `batch_size` rows is `num_shards` blocks of `batch_size // num_shards` consecutive rows; block
s comes from input shard s, its own BatchIterator over every num_shards-th document. The batches therefore depend on
num_shards, never on how many processes read them: one process reading shards [0, 1] draws the same global batches
as two processes reading [0] and [1] (docs/data.md).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from flm_jax.data._tf import tf
from flm_jax.data.pipeline import STATE_FORMAT as SINGLE_STREAM_FORMAT
from flm_jax.data.pipeline import Batch, BatchIterator

STATE_FORMAT = "flm_jax.data.ShardedBatches/1"


@dataclasses.dataclass(frozen=True)
class ShardedSpec:
    """What identifies the global stream; with `batches_consumed` it is the JSON part of its state."""

    name: str
    split: str
    batch_size: int  # global rows per batch
    seq_len: int
    seed: int
    num_shards: int = 1

    @property
    def rows_per_shard(self) -> int:
        return self.batch_size // self.num_shards


class ShardedBatches:
    """The rows of each global batch that come from `shards` (in shard order), and their checkpointable state.

    `state()` is the same JSON on every process; `iterator_states()` holds one tf.data snapshot per shard read
    here. `ShardedBatches.from_state(state, shards, iterator_states)` resumes with the next batch, restoring the
    snapshots it is given (time independent of the step) and skipping from the start for the shards it is not.
    """

    def __init__(
        self,
        spec: ShardedSpec,
        shards: Sequence[int],
        *,
        batches_consumed: int = 0,
        iterator_states: Mapping[int, bytes] | None = None,
    ):
        if spec.num_shards < 1 or spec.batch_size % spec.num_shards:
            raise ValueError(
                f"the batch of {spec.batch_size} rows cannot be cut into {spec.num_shards} input shards: make "
                "TrainConfig.batch_size a multiple of TrainConfig.input_shards"
            )
        if not shards or sorted(set(shards)) != list(shards) or not 0 <= shards[0] <= shards[-1] < spec.num_shards:
            raise ValueError(f"shards must be increasing indices in [0, {spec.num_shards}), got {list(shards)}")
        self.spec, self.shards = spec, tuple(shards)
        states = iterator_states or {}
        self.restored_shards = tuple(s for s in self.shards if s in states)
        self._iterators = [
            BatchIterator(
                spec.name,
                spec.split,
                spec.rows_per_shard,
                spec.seq_len,
                spec.seed,
                shard_index=s,
                num_shards=spec.num_shards,
                batches_consumed=batches_consumed,
                iterator_state=states.get(s),
            )
            for s in self.shards
        ]
        self._consumed = int(batches_consumed)
        self._warned = False

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        parts = [next(it) for it in self._iterators]
        self._consumed += 1
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    @property
    def rows(self) -> int:
        """Rows per batch read here."""
        return self.spec.rows_per_shard * len(self.shards)

    def state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **dataclasses.asdict(self.spec), "batches_consumed": self._consumed}

    def iterator_states(self, shards: Sequence[int] | None = None) -> dict[int, bytes]:
        """{shard: tf.data snapshot} of `shards` (default: all read here); empty when the source cannot be
        snapshotted (a resume then skips from the start)."""
        wanted = self.shards if shards is None else shards
        try:
            return {s: it.serialize() for s, it in zip(self.shards, self._iterators) if s in wanted}
        except tf.errors.OpError as e:
            if not self._warned:
                print(f"{self.spec.name}: no iterator snapshots ({e.message}); a resume will skip.", file=sys.stderr)
                self._warned = True
            return {}

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], shards: Sequence[int], iterator_states: Mapping[int, bytes] | None = None
    ) -> ShardedBatches:
        """Resume a `state()`; a single-stream BatchIterator state (checkpoints before input shards) is the
        stream of one shard."""
        state = dict(state)
        fmt = state.pop("format", None)
        consumed = state.pop("batches_consumed")
        if fmt == SINGLE_STREAM_FORMAT:
            state = {k: state[k] for k in ("name", "split", "batch_size", "seq_len", "seed")}
        elif fmt != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state: {state}")
        return cls(ShardedSpec(**state), shards, batches_consumed=consumed, iterator_states=iterator_states)
