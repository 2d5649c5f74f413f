"""TrainConfig: the settings of one training run.

gin binds it at the entry point (`TrainConfig.steps = ...`); it lives outside the `flm_jax.train` module so that
`python -m flm_jax.train` does not register it twice, and it imports nothing from flm_jax.data (TensorFlow), so
tools that never read data parse gin files that bind it without starting TensorFlow.
"""

from __future__ import annotations

import dataclasses

import gin
from flm_jax.config import ConfigError, check_field_types


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global, in packed sequences
    seq_len: int = 256
    num_microbatches: int = 1  # gradient accumulation inside one step
    mixture: str = "flm_default"  # a seqio task or mixture; flm_default is the embedded corpus (docs/data.md)
    seed: int = 0  # parameter init and data order
    # The global batch is cut into this many input shards, each its own pipeline over every input_shards-th
    # document; a process reads only the shards of the rows its devices hold. None: one per process. The data
    # depend on this number, not on the process count (docs/data.md).
    input_shards: int | None = None
    # Start from the parameters of another workdir's latest checkpoint (fine-tuning) with a fresh optimizer and this
    # run's schedule; None: random initialisation. See flm_jax/training/init_from.py.
    init_from: str | None = None
    z_loss: float = 0.0
    # A step whose loss or gradient is not finite is skipped (no update); this many in a row stop the run.
    max_nonfinite_steps: int = 10
    log_every: int = 10
    eval_every: int = 0  # evaluate every N steps; always at the first step of a run (the starting point) and the end
    eval_tasks: tuple[str, ...] = ("flm_prose", "flm_code")  # validation loss and BPB per domain
    eval_split: str = "validation"  # 'minival': the embedded corpus's small fixed validation set (docs/data.md)
    eval_seq_len: int | None = None  # packed length of validation rows; None: seq_len (stages compare at one length)
    eval_batch_size: int = 16
    checkpoint_every: int = 100
    max_to_keep: int = 3
    async_checkpointing: bool = True
    # (first, last): a jax.profiler trace of steps first..last into WORKDIR/tensorboard (TensorBoard's profile tab,
    # or Perfetto); None: no trace.
    profile_steps: tuple[int, int] | None = None

    def __post_init__(self):
        check_field_types(self)
        if self.profile_steps is not None and (
            len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]
        ):
            raise ConfigError(
                f"TrainConfig.profile_steps={self.profile_steps} must be (first, last) with 1 <= first <= last."
            )
        if self.batch_size % self.num_microbatches:
            raise ConfigError(
                f"TrainConfig.batch_size={self.batch_size} is not divisible by num_microbatches="
                f"{self.num_microbatches}."
            )
        if self.input_shards is not None and (self.input_shards < 1 or self.batch_size % self.input_shards):
            raise ConfigError(
                f"TrainConfig.input_shards={self.input_shards} must be >= 1 and divide batch_size={self.batch_size}."
            )
        if min(self.steps, self.log_every, self.checkpoint_every, self.max_nonfinite_steps) < 1:
            raise ConfigError("TrainConfig.steps, log_every, checkpoint_every and max_nonfinite_steps must be >= 1.")
