"""MSG (Masked Structural Growth) state: which structure is new, the mask ramp, and the masks the model uses.

The state lives in checkpoint metadata under "growth" (JSON). The ramp value m(step) = clip((step - start) /
ramp_steps, 0, 1) is computed from the traced step inside the jitted train step, so the ramp never recompiles.
At m = 1 the masked model is exactly the plain model (masked RMS over all coordinates is the plain RMS), so the
masks are dropped ("folded") once the ramp has ended.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from flm_jax.config import TeleFLMConfig
from flm_jax.model import GrowthMasks


def growth_state(src: TeleFLMConfig, order, start_step: int, ramp_steps: int) -> dict[str, Any]:
    return {"start_step": int(start_step), "ramp_steps": int(ramp_steps), "old_hidden": src.hidden_size,
            "old_heads": src.num_attention_heads, "old_ffn": src.intermediate_size,
            "new_layers": [bool(new) for _, new in order]}


def ramp_value(state: dict[str, Any], step) -> jnp.ndarray:
    return jnp.clip((jnp.asarray(step, jnp.float32) - state["start_step"]) / state["ramp_steps"], 0.0, 1.0)


def ramp_done(state: dict[str, Any] | None, step: int) -> bool:
    return state is None or step >= state["start_step"] + state["ramp_steps"]


def build_masks(state: dict[str, Any], config: TeleFLMConfig, m) -> GrowthMasks:
    """1 on old structure, m on new structure."""
    m = jnp.asarray(m, jnp.float32)

    def mask(size, old):
        return jnp.where(jnp.arange(size) < old, 1.0, m)

    layers = jnp.where(jnp.asarray(state["new_layers"]), m, 1.0)
    return GrowthMasks(hidden=mask(config.hidden_size, state["old_hidden"]),
                       heads=mask(config.num_attention_heads, state["old_heads"]),
                       ffn=mask(config.intermediate_size, state["old_ffn"]), layers=layers)
