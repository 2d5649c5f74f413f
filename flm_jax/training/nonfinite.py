"""Steps with a non-finite loss or gradient: the train step skips their update (training/step.py); this counts
them without a host sync per step, stops a run of them, and refuses to checkpoint non-finite parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flm_jax.config import ConfigError


class TrainingDiverged(ConfigError):
    """The run stopped on non-finite values; the message names the step and the last good checkpoint."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))


def all_finite(tree) -> bool:
    """One compile per tree structure, not one per checkpoint."""
    return bool(_all_finite(tree))


class NonFiniteGuard:
    def __init__(self, limit: int):
        self.limit = limit
        # On device, updated asynchronously: read only when the loop logs or saves.
        self.in_a_row, self.total = 0, 0

    def count(self, nonfinite: jax.Array) -> None:
        """nonfinite: the step's 0/1 metric."""
        self.in_a_row = jnp.where(nonfinite > 0, self.in_a_row + 1, 0)
        self.total = self.total + nonfinite

    def check(self, step: int, last_checkpoint: str) -> int:
        """-> the number of skipped steps so far; raises once `limit` steps in a row were skipped."""
        in_a_row = int(self.in_a_row)
        if in_a_row >= self.limit:
            raise TrainingDiverged(
                f"{in_a_row} steps in a row up to step {step} had a non-finite loss or gradient "
                f"(TrainConfig.max_nonfinite_steps={self.limit}); their updates were skipped. The last good "
                f"checkpoint is {last_checkpoint}: lower OptimizerConfig.peak_learning_rate or check the data, then "
                "run again to resume from it."
            )
        return int(self.total)

    def check_saveable(self, params, step: int, last_checkpoint: str) -> None:
        if not all_finite(params):
            raise TrainingDiverged(
                f"The parameters at step {step} are not finite; no checkpoint was written. The last good checkpoint "
                f"is {last_checkpoint}."
            )
