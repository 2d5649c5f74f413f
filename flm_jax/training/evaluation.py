"""Validation loss and bits per byte of a model during training, per eval task and in total."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from flm_jax import data
from flm_jax.config import TeleFLMConfig
from flm_jax.growth.msg import MSGRamp
from flm_jax.partitioning import MeshLayout, batch_sharding, global_batch, replicated
from flm_jax.training.step import make_eval_step


class Evaluator:
    """Validation loss and bits per byte for each eval task, over every validation document."""

    def __init__(
        self,
        tasks: Sequence[str],
        batch_size: int,
        seq_len: int,
        config: TeleFLMConfig,
        layout: MeshLayout,
        mesh,
        params_shardings: Any,
    ):
        self.sets = {task: data.validation_set(task, batch_size, seq_len) for task in tasks}
        self.sharding = batch_sharding(mesh, layout)
        self.config, self.layout, self.mesh, self.params_shardings = config, layout, mesh, params_shardings
        self.use_ramp(None)

    def use_ramp(self, ramp: MSGRamp | None) -> None:
        """(Re)compile the eval step for an MSG ramp in progress, or for the plain model."""
        self.step = jax.jit(
            make_eval_step(self.config, self.layout, ramp),
            in_shardings=(self.params_shardings, self.sharding, replicated(self.mesh)),
        )

    def __call__(self, params, step: int) -> dict[str, float]:
        results, total_nll, total_tokens, total_bytes = {}, 0.0, 0.0, 0
        for task, vset in self.sets.items():
            nll = tokens = 0.0
            for batch in vset.batches:
                n, t = self.step(params, global_batch(batch, self.sharding), step)
                nll, tokens = nll + float(n), tokens + float(t)
            results[f"val_loss/{task}"] = nll / tokens
            results[f"val_bpb/{task}"] = data.bits_per_byte(nll, vset.num_bytes)
            total_nll, total_tokens, total_bytes = total_nll + nll, total_tokens + tokens, total_bytes + vset.num_bytes
        results["val_loss"] = total_nll / total_tokens
        results["val_bpb"] = data.bits_per_byte(total_nll, total_bytes)
        return results
