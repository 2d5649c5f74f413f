"""Per-host input: which input shards each process reads, and the training stream it resumes.

The batch sharding decides which rows of the global batch each process's devices hold; those rows are whole input
shards (flm_jax/data/sharded.py), so a process reads, tokenises and packs only its own, and
partitioning.global_batch assembles the global array from every process's rows.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
from jax.sharding import NamedSharding

from flm_jax import data
from flm_jax.config import ConfigError
from flm_jax.training.config import TrainConfig


def shards_by_process(sharding: NamedSharding, batch_size: int, num_shards: int) -> dict[int, tuple[int, ...]]:
    """{process index: the input shards that its devices' rows make up}, for every process of the mesh."""
    per_shard = batch_size // num_shards
    rows: dict[int, set[int]] = {}
    for device, idx in sharding.devices_indices_map((batch_size,)).items():
        rows.setdefault(device.process_index, set()).update(range(*idx[0].indices(batch_size)))
    shards = {}
    for process, held in rows.items():
        shards[process] = tuple(sorted({r // per_shard for r in held}))
        contiguous = shards[process] == tuple(range(shards[process][0], shards[process][-1] + 1))
        if len(held) != per_shard * len(shards[process]) or not contiguous:  # global_batch needs one block
            raise ConfigError(
                f"process {process}'s devices hold {len(held)} rows of the batch of {batch_size}, not one block of "
                f"whole input shards of {per_shard} rows ({num_shards} shards); set TrainConfig.input_shards to a "
                "multiple of the number of processes the batch is split over (None: one per process), and keep each "
                "process's devices neighbours on the mesh's batch axes"
            )
    return shards


def shards_to_write(by_process: Mapping[int, tuple[int, ...]], process: int) -> tuple[int, ...]:
    """The shards whose iterator snapshot `process` writes: those it is the lowest-numbered reader of."""
    first_reader: dict[int, int] = {}
    for p in sorted(by_process):
        for s in by_process[p]:
            first_reader.setdefault(s, p)
    return tuple(s for s in by_process[process] if first_reader[s] == process)


class TrainInput(NamedTuple):
    stream: data.ShardedBatches  # this process's rows of every global batch
    snapshot_shards: tuple[int, ...]  # the shards whose iterator snapshots this process writes


def train_input(
    train_cfg: TrainConfig,
    sharding: NamedSharding,
    data_state: Mapping,
    load_snapshots: Callable[[tuple[int, ...]], Mapping[int, bytes]],
    step: int,
) -> TrainInput:
    """Continue the checkpoint's data stream from its iterator snapshots (`load_snapshots(shards)`; skipping
    from the start for a shard without one). With TrainConfig.input_shards=None a resumed stream keeps its shard
    count where this mesh can read it (so a run may resume on fewer processes), else there is one per process.
    An empty state (a new run, an import_hf checkpoint) starts the configured stream; a stream of another mixture,
    batch size, length or shard count (a new stage after growth) is replaced by a fresh one seeded with
    seed + step, so it does not replay the batches already seen."""
    saved = tuple(data_state.get(k) for k in ("name", "batch_size", "seq_len")) if data_state else None
    saved_shards = data_state.get("num_shards", 1) if data_state else None
    num_shards = train_cfg.input_shards or jax.process_count()
    if train_cfg.input_shards is None and saved_shards and train_cfg.batch_size % saved_shards == 0:
        try:
            shards_by_process(sharding, train_cfg.batch_size, saved_shards)
            num_shards = saved_shards
        except ConfigError:  # this mesh cuts the saved shards: one per process, a fresh stream
            pass
    by_process = shards_by_process(sharding, train_cfg.batch_size, num_shards)
    shards = by_process[jax.process_index()]
    wanted = (train_cfg.mixture, train_cfg.batch_size, train_cfg.seq_len)
    if saved == wanted and saved_shards == num_shards:
        stream = data.ShardedBatches.from_state(data_state, shards, load_snapshots(shards))
    else:
        if data_state:
            print(
                f"The data stream changed ({saved[0]}, batch {saved[1]} x {saved[2]} in {saved_shards} input shards"
                f" -> {wanted[0]}, batch {wanted[1]} x {wanted[2]} in {num_shards}): starting a fresh stream.",
                flush=True,
            )
        spec = data.ShardedSpec(
            train_cfg.mixture, "train", train_cfg.batch_size, train_cfg.seq_len, train_cfg.seed + step, num_shards
        )
        stream = data.ShardedBatches(spec, shards)
    return TrainInput(stream, shards_to_write(by_process, jax.process_index()))


def describe(stream: data.ShardedBatches) -> None:
    """One line per process on stderr: its shards, rows and how its position was restored."""
    spec = stream.spec
    how = ""
    if stream.batches_consumed:
        skipped = [s for s in stream.shards if s not in stream.restored_shards]
        how = f"; resumed at batch {stream.batches_consumed}" + (
            f" by skipping (no snapshot for shards {skipped})" if skipped else " from iterator snapshots"
        )
    print(
        f"Input: process {jax.process_index()} of {jax.process_count()} reads shards {list(stream.shards)} of "
        f"{spec.num_shards} ({stream.rows} of {spec.batch_size} rows per batch){how}.",
        file=sys.stderr,
        flush=True,
    )
