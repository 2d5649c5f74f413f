"""The language-modelling objective on a packed batch (the unit the train and eval steps differentiate)."""

from __future__ import annotations

from typing import Any

import jax

from flm_jax.config import TeleFLMConfig
from flm_jax.losses import cross_entropy
from flm_jax.model import GrowthMasks, TeleFLM

def lm_loss(params: Any, batch: dict[str, jax.Array], config: TeleFLMConfig, z_loss: float = 0.0,
            normaliser: jax.Array | None = None,
            masks: GrowthMasks | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss (token mean unless a normaliser is given) and the summed NLL / token count. `batch` holds [batch,
    length] arrays inputs, targets, segment_ids, positions and loss_weights (flm_jax/data packs them)."""
    logits_btv = TeleFLM(config).apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
                                       masks)
    return cross_entropy(logits_btv, batch["targets"], batch["loss_weights"], z_loss, normaliser)
