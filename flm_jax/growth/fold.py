"""A grown checkpoint as a plain (mask-free) model, for export and generation.

A checkpoint's MSG ramp (flm_jax/growth/msg.py) decides what it computes:
  m = 1 (or no ramp)  the masked model is the plain grown model: its parameters are read as they are;
  m = 0               the masked model equals the source model. Its plain equivalent of the grown shape: new
                      residual coordinates are never written (embedding, o_proj and down_proj columns beyond the
                      old hidden size are zeroed), new heads and FFN units are never read (their o_proj / down_proj
                      rows zeroed), new layers are identities (their o_proj / down_proj zeroed), and the RMSNorm
                      corrections of exact zero padding (eps x d/D, scale x sqrt(d/D)) make the plain mean over
                      all D coordinates equal the masked mean over the old d (docs/growth_math.md);
  0 < m < 1           neither: refused with GrowthRampError.
"""

from __future__ import annotations

import numpy as np

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.growth.msg import MSGRamp
from flm_jax.training.checkpoint_reader import CheckpointReader, ParamSource, TreePath


class GrowthRampError(ConfigError):
    """The checkpoint is mid-way through a growth mask ramp: its function is not a plain model's."""


def folded_config(config: TeleFLMConfig, ramp: MSGRamp) -> TeleFLMConfig:
    ratio = ramp.old_hidden / config.hidden_size
    return config.replace(rms_norm_eps=config.rms_norm_eps * ratio, rms_norm_scale=config.rms_norm_scale * ratio**0.5)


def fold_array(path: TreePath, x: np.ndarray, ramp: MSGRamp, layers: list[int] | None = None) -> np.ndarray:
    """Zero what masks at 0 hide. `x` is the whole stacked array, or the given layers of it."""
    name = path[-1]
    x = np.array(x, copy=True)
    d = ramp.old_hidden
    if name in ("embed_tokens", "o_proj", "down_proj"):
        x[..., d:] = 0  # writers of new residual coordinates
    if name in ("o_proj", "down_proj"):
        old = ramp.old_heads if name == "o_proj" else ramp.old_ffn
        new_layers = np.asarray(ramp.new_layers)
        selected = new_layers if layers is None else new_layers[layers]
        x[:, old:] = 0  # rows of new heads / FFN units (axis 1 after the layer axis)
        x[selected] = 0  # new layers start as identities
    return x


class FoldedSource:
    """A ParamSource of the plain model equivalent to a checkpoint at mask 0."""

    def __init__(self, reader: CheckpointReader, ramp: MSGRamp):
        self.reader, self.ramp = reader, ramp
        self.config = folded_config(reader.config, ramp)

    def shape(self, path: TreePath) -> tuple[int, ...]:
        return self.reader.shape(path)

    def read(self, path: TreePath) -> np.ndarray:
        return fold_array(path, self.reader.read(path), self.ramp)

    def read_layer(self, path: TreePath, layer: int) -> np.ndarray:
        return fold_array(path, self.reader.read_layer(path, layer)[None], self.ramp, [layer])[0]


def plain_source(reader: CheckpointReader) -> ParamSource:
    """The checkpoint as a plain model (see the module docstring); GrowthRampError mid-way through a ramp."""
    ramp = MSGRamp.from_metadata(reader.metadata)
    mask = 1.0 if ramp is None else float(ramp.value(reader.step))
    if mask == 1.0:
        return reader
    if mask == 0.0:
        return FoldedSource(reader, ramp)
    raise GrowthRampError(
        f"checkpoint step {reader.step} is in the middle of a growth mask ramp (mask {mask:g}): its function "
        "is neither the source model nor the plain grown model, so it cannot be used as a plain model. "
        "Use a checkpoint from before the growth, or one from after the ramp has reached mask 1."
    )
