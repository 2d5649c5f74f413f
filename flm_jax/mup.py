"""μP as the Tele-FLM series used it (μScaling / FLM-101B; docs/paper.md), derived from the model config alone.

width_mult = hidden_size / base_width = `mup_scale_factor` (the Hugging Face field), so a grown model whose config
carries the new factor gets the right multipliers. `TeleFLMConfig.use_mup` selects the parametrisation:

| parameter class | examples | init std (μP)                  | Adam lr  | weight decay |
|---|---|---|---|---|
| embedding       | embed_tokens | σ                          | lr       | wd           |
| readout         | lm_head      | σ (logits x output_mult / width_mult in the forward pass) | lr | wd |
| hidden          | q/k/v, gate/up | σ / sqrt(width_mult)     | lr / width_mult | wd x width_mult |
| hidden_residual | o, down      | σ / sqrt(width_mult) / sqrt(2 L) | lr / width_mult | wd x width_mult |
| vector          | norm gains   | ones                           | lr       | none         |

Standard parametrisation (use_mup=False) is the same table at width_mult 1 with no forward multipliers, so μP
with mup_scale_factor = input_mult = output_mult = 1 is exactly SP. The 1/sqrt(2L) depth scaling of residual
projections (GPT-2 / Megatron practice) applies to both.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from flm_jax.config import TeleFLMConfig

PARAM_CLASSES = {
    "embed_tokens": "embedding",
    "lm_head": "readout",
    "scale": "vector",
    "q_proj": "hidden",
    "k_proj": "hidden",
    "v_proj": "hidden",
    "gate_proj": "hidden",
    "up_proj": "hidden",
    "o_proj": "hidden_residual",
    "down_proj": "hidden_residual",
}
HIDDEN = ("hidden", "hidden_residual")


def param_class(name: str) -> str:
    if name not in PARAM_CLASSES:
        raise KeyError(f"parameter {name!r} has no μP class; add it to flm_jax.mup.PARAM_CLASSES")
    return PARAM_CLASSES[name]


def width_mult(config: TeleFLMConfig) -> float:
    return config.mup_scale_factor if config.use_mup else 1.0


def init_std(config: TeleFLMConfig, name: str) -> float | None:
    """Initial standard deviation of parameter `name` (None: initialised to ones)."""
    kind = param_class(name)
    if kind == "vector":
        return None
    std = config.initializer_range
    if kind in HIDDEN:
        std /= math.sqrt(width_mult(config))
    if kind == "hidden_residual":
        std /= math.sqrt(2 * config.num_hidden_layers)
    return std


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def param_multipliers(params: Any, config: TeleFLMConfig) -> tuple[Any, Any]:
    """(Adam learning-rate multipliers, weight-decay multipliers) for every leaf of a parameter tree."""
    m = width_mult(config)

    def lr(path, _):
        return 1.0 / m if param_class(_leaf_name(path)) in HIDDEN else 1.0

    def wd(path, _):
        kind = param_class(_leaf_name(path))
        return 0.0 if kind == "vector" else (m if kind in HIDDEN else 1.0)

    return jax.tree_util.tree_map_with_path(lr, params), jax.tree_util.tree_map_with_path(wd, params)
