"""Training: TrainConfig, the train state and its steps, the loop, evaluation, metrics and checkpoints.

    from flm_jax.training.loop import train
    train(workdir, model_cfg=..., layout=..., optimizer_cfg=..., train_cfg=TrainConfig(steps=100))

This package's own import is light (no TensorFlow): the loop and evaluation, which read data, are imported from
their modules.
"""

from flm_jax.training.config import TrainConfig
from flm_jax.training.state import StateSpec, TrainState

__all__ = ["StateSpec", "TrainConfig", "TrainState"]
