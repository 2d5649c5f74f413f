"""Fold MSG masks at 0 into a plain model that computes the same function (for export).

At m = 0 the masked model equals the source model. The plain equivalent of the grown shape: new residual
coordinates are never written (embedding, o_proj and down_proj columns beyond the old hidden size are zeroed),
new heads and FFN units are never read (their o_proj / down_proj rows zeroed), new layers are identities (their
o_proj / down_proj zeroed), and the RMSNorm corrections of exact zero padding (eps x d/D, scale x sqrt(d/D))
make the plain mean over all D coordinates equal the masked mean over the old d (shared/GROWTH.md).
Masks at 1 need no folding: the masked model is the plain model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flm_jax.config import TeleFLMConfig

TreePath = tuple[str, ...]


def folded_config(config: TeleFLMConfig, growth: dict[str, Any]) -> TeleFLMConfig:
    ratio = growth["old_hidden"] / config.hidden_size
    return config.replace(rms_norm_eps=config.rms_norm_eps * ratio, rms_norm_scale=config.rms_norm_scale * ratio**0.5)


def fold_array(path: TreePath, x: np.ndarray, growth: dict[str, Any], layers: list[int] | None = None) -> np.ndarray:
    """Zero what masks at 0 hide. `x` is the whole stacked array, or the given layers of it."""
    name = path[-1]
    x = np.array(x, copy=True)
    d = growth["old_hidden"]
    if name in ("embed_tokens", "o_proj", "down_proj"):
        x[..., d:] = 0  # writers of new residual coordinates
    if name in ("o_proj", "down_proj"):
        old = growth["old_heads"] if name == "o_proj" else growth["old_ffn"]
        new_layers = np.asarray(growth["new_layers"])
        selected = new_layers if layers is None else new_layers[layers]
        x[:, old:] = 0  # rows of new heads / FFN units (axis 1 after the layer axis)
        x[selected] = 0  # new layers start as identities
    return x


class FoldedSource:
    """A ParamSource (see flm_jax/checkpoint_reader.py) of the plain model equivalent to a checkpoint at mask 0."""

    def __init__(self, reader):
        self.reader = reader
        self.growth = reader.metadata["growth"]
        self.config = folded_config(reader.config, self.growth)

    def shape(self, path: TreePath) -> tuple[int, ...]:
        return self.reader.shape(path)

    def read(self, path: TreePath) -> np.ndarray:
        return fold_array(path, self.reader.read(path), self.growth)

    def read_layer(self, path: TreePath, layer: int) -> np.ndarray:
        return fold_array(path, self.reader.read_layer(path, layer)[None], self.growth, [layer])[0]


def fold_for_export(reader) -> FoldedSource:
    return FoldedSource(reader)
