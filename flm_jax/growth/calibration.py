"""What growth measures on a probe batch of the embedded validation text: the per-layer distances that the
distance-based layer selection ranks, and the function-preservation check of a grown model."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from flm_jax import data
from flm_jax.config import TeleFLMConfig
from flm_jax.model import GrowthMasks, TeleFLM
from flm_jax.training.step import lm_loss

PROBE_TASK = "flm_prose"


def probe_batch(config: TeleFLMConfig, batch_size: int = 4, seq_len: int = 128) -> dict[str, np.ndarray]:
    """The first packed validation rows of the embedded corpus (deterministic)."""
    seq_len = min(seq_len, config.max_position_embeddings)
    return data.validation_set(PROBE_TASK, batch_size, seq_len).batches[0]


def layer_distances(config: TeleFLMConfig, params: Any, batch: dict[str, np.ndarray]) -> list[float]:
    """1 - cos(h_in, h_out) per layer on the probe batch (the distance-based layer selection's calibration)."""
    _, state = TeleFLM(config, record_internals=True).apply(
        {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], mutable=["intermediates"]
    )
    return np.asarray(state["intermediates"]["layers"]["cos_distance"][0]).tolist()


@functools.partial(jax.jit, static_argnums=0)  # one compile; run eagerly, the model compiled ~140 single operations
def _compiled_logits_and_loss(config: TeleFLMConfig, params: Any, batch, masks: GrowthMasks | None):
    logits = TeleFLM(config).apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], masks)
    loss, _ = lm_loss(params, batch, config, masks=masks)
    return logits, loss


def _logits_and_loss(config: TeleFLMConfig, params: Any, batch, masks: GrowthMasks | None = None):
    logits, loss = _compiled_logits_and_loss(config, params, batch, masks)
    return np.asarray(logits), float(loss)


def preservation(
    src: TeleFLMConfig, src_params: Any, tgt: TeleFLMConfig, tgt_params: Any, batch, masks: GrowthMasks | None = None
) -> dict[str, float]:
    """How far the grown model's function is from the source's on `batch`: max |Δlogit| over real tokens and
    the source's vocabulary (new tokens have no old logit), and the loss before and after."""
    old_logits, old_loss = _logits_and_loss(src, src_params, batch)
    new_logits, new_loss = _logits_and_loss(tgt, tgt_params, batch, masks)
    real = batch["segment_ids"] != 0
    delta = np.abs(new_logits[..., : src.vocab_size] - old_logits)[real]
    return {
        "max_abs_dlogit": float(delta.max()),
        "dloss": new_loss - old_loss,
        "loss_before": old_loss,
        "loss_after": new_loss,
    }
