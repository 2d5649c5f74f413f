"""Validation loss and bits per byte per eval task and in total: during training (Evaluator) and for the evaluate
tool (flm_jax/inference/evaluation.py), one implementation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from flm_jax import data
from flm_jax.config import TeleFLMConfig
from flm_jax.growth.msg import MSGRamp
from flm_jax.multihost import max_over_processes
from flm_jax.partitioning import MeshLayout, batch_sharding, global_batch, replicated
from flm_jax.training.input import shards_by_process
from flm_jax.training.step import make_eval_step


class DomainScore(NamedTuple):
    """Summed token NLL over every validation document of a task, per token and per UTF-8 byte."""

    loss: float  # mean NLL per target token (nats)
    tokens: float  # target tokens (each document's tokens plus its eos)
    bytes: int  # UTF-8 bytes of the documents' text
    bpb: float  # summed NLL / (ln 2 x bytes)

    @classmethod
    def of(cls, nll: float, tokens: float, num_bytes: int) -> DomainScore:
        return cls(nll / tokens, tokens, num_bytes, data.bits_per_byte(nll, num_bytes))


def score_sets(
    eval_step: Callable, params: Any, sets: dict[str, data.ValidationSet], sharding, step: int = 0
) -> tuple[dict[str, DomainScore], DomainScore]:
    """(score per set, total over all sets); eval_step(params, batch, step) -> (summed NLL, token count)."""
    scores, total_nll, total_tokens, total_bytes = {}, 0.0, 0.0, 0
    for name, vset in sets.items():
        nll = tokens = 0.0
        for batch in vset.batches:
            n, t = eval_step(params, global_batch(batch, sharding, vset.batch_size), step)
            nll, tokens = nll + float(n), tokens + float(t)
        scores[name] = DomainScore.of(nll, tokens, vset.num_bytes)
        total_nll, total_tokens, total_bytes = total_nll + nll, total_tokens + tokens, total_bytes + vset.num_bytes
    return scores, DomainScore.of(total_nll, total_tokens, total_bytes)


def host_validation_set(
    task: str, batch_size: int, seq_len: int, sharding, split: str = "validation"
) -> data.ValidationSet:
    """The rows of `task`'s validation batches that this process's devices hold, read from its input shards
    alone (one shard per process)."""
    num_shards = jax.process_count()
    shards = shards_by_process(sharding, batch_size, num_shards)[jax.process_index()]
    return data.validation_set(
        task, batch_size, seq_len, split, shards=shards, num_shards=num_shards, agree_on_count=max_over_processes
    )


class Evaluator:
    """Validation loss and bits per byte for each eval task, over every document of its `split`."""

    def __init__(
        self,
        tasks: Sequence[str],
        batch_size: int,
        seq_len: int,
        config: TeleFLMConfig,
        layout: MeshLayout,
        mesh,
        params_shardings: Any,
        split: str = "validation",
    ):
        self.sharding = batch_sharding(mesh, layout)
        self.sets = {task: host_validation_set(task, batch_size, seq_len, self.sharding, split) for task in tasks}
        self.config, self.layout, self.mesh, self.params_shardings = config, layout, mesh, params_shardings
        self.use_ramp(None)

    def use_ramp(self, ramp: MSGRamp | None) -> None:
        """(Re)compile the eval step for an MSG ramp in progress, or for the plain model."""
        self.step = jax.jit(
            make_eval_step(self.config, self.layout, ramp),
            in_shardings=(self.params_shardings, self.sharding, replicated(self.mesh)),
        )

    def __call__(self, params, step: int) -> dict[str, float]:
        scores, total = score_sets(self.step, params, self.sets, self.sharding, step)
        results = {}
        for task, score in scores.items():
            results[f"val_loss/{task}"], results[f"val_bpb/{task}"] = score.loss, score.bpb
        results["val_loss"], results["val_bpb"] = total.loss, total.bpb
        return results
