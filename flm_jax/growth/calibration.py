"""What growth measures on a probe batch of the embedded validation text: the per-layer distances that the
distance-based layer selection ranks, and the function-preservation check of a grown model."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np

from flm_jax import data
from flm_jax.config import TeleFLMConfig
from flm_jax.losses import cross_entropy
from flm_jax.model import GrowthMasks, TeleFLM

PROBE_TASK = "flm_prose"


class Probe(NamedTuple):
    """One model's outputs on the probe batch."""

    logits: np.ndarray  # [batch, length, vocab]
    loss: float  # token mean
    layer_distances: list[float] | None  # 1 - cos(h_in, h_out) per layer, when asked for


def probe_batch(config: TeleFLMConfig, batch_size: int = 4, seq_len: int = 128) -> dict[str, np.ndarray]:
    """The first packed validation rows of the embedded corpus (deterministic)."""
    seq_len = min(seq_len, config.max_position_embeddings)
    return data.first_validation_batches(PROBE_TASK, batch_size, seq_len, 1)[0]


# One compile per model; run eagerly, the model compiled ~140 single operations.
@functools.partial(jax.jit, static_argnums=(0, 4))
def _compiled_probe(config: TeleFLMConfig, params: Any, batch, masks: GrowthMasks | None, with_distances: bool):
    logits, state = TeleFLM(config, record_internals=with_distances).apply(
        {"params": params},
        batch["inputs"],
        batch["segment_ids"],
        batch["positions"],
        masks,
        mutable=["intermediates"],
    )
    loss, _ = cross_entropy(logits, batch["targets"], batch["loss_weights"])
    distances = state["intermediates"]["layers"]["cos_distance"][0] if with_distances else None
    return logits, loss, distances


def probe(
    config: TeleFLMConfig, params: Any, batch, masks: GrowthMasks | None = None, layer_distances: bool = False
) -> Probe:
    """Logits and loss of the model on `batch` (and its layer distances), in one compiled forward pass."""
    logits, loss, distances = _compiled_probe(config, params, batch, masks, layer_distances)
    return Probe(np.asarray(logits), float(loss), None if distances is None else np.asarray(distances).tolist())


def layer_distances(config: TeleFLMConfig, params: Any, batch: dict[str, np.ndarray]) -> list[float]:
    """1 - cos(h_in, h_out) per layer on the probe batch (the distance-based layer selection's calibration)."""
    return probe(config, params, batch, layer_distances=True).layer_distances


def preservation(before: Probe, after: Probe, batch) -> dict[str, float]:
    """How far the grown model's function (`after`) is from the source's (`before`) on `batch`: max |Δlogit| over
    real tokens and the source's vocabulary (new tokens have no old logit), and the loss before and after."""
    real = batch["segment_ids"] != 0
    source_vocab = before.logits.shape[-1]
    delta = np.abs(after.logits[..., :source_vocab] - before.logits)[real]
    return {
        "max_abs_dlogit": float(delta.max()),
        "dloss": after.loss - before.loss,
        "loss_before": before.loss,
        "loss_after": after.loss,
    }
