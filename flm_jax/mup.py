"""μP as the Tele-FLM series used it (μScaling / FLM-101B; docs/mup.md, docs/paper.md), from the model config alone.

Each hidden matrix has its own width multiplier, fan-in over the base model's fan-in: hidden_size /
mup_base_hidden_size for the matrices that read the hidden state (q/k/v, gate/up) and for o_proj (its fan-in,
heads x head_dim, is the hidden size), intermediate_size / mup_base_intermediate_size for down_proj. The logit
multiplier (output_mult / mup_scale_factor, the HF fields) is a separate forward-pass setting. Growth keeps the base
shape, so a grown model gets exactly the multipliers of a fresh model of its shape. `TeleFLMConfig.use_mup` selects
the parametrisation (w = the matrix's width multiplier):

| parameter class | examples | init std (μP)                  | Adam lr  | weight decay |
|---|---|---|---|---|
| embedding       | embed_tokens | σ                          | lr       | wd           |
| readout         | lm_head      | σ (logits x output_mult / mup_scale_factor in the forward pass) | lr | wd |
| hidden          | q/k/v, gate/up | σ / sqrt(w)              | lr / w   | wd x w       |
| hidden_residual | o, down      | σ / sqrt(w) / sqrt(2 L)        | lr / w   | wd x w       |
| vector          | norm gains   | ones                           | lr       | none         |

Standard parametrisation (use_mup=False) is the same table at w = 1 with no forward multipliers, so μP at the base
shape with input_mult = output_mult = mup_scale_factor = 1 is exactly SP. The 1/sqrt(2L) depth scaling of residual
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
# Which base size a hidden matrix's fan-in is measured against (all others read the hidden state).
FFN_FAN_IN = ("down_proj",)


def param_class(name: str) -> str:
    if name not in PARAM_CLASSES:
        raise KeyError(f"parameter {name!r} has no μP class; add it to flm_jax.mup.PARAM_CLASSES")
    return PARAM_CLASSES[name]


def width_mult(config: TeleFLMConfig, name: str) -> float:
    """The μP width multiplier of hidden matrix `name`: its fan-in over the base model's (1 under SP)."""
    if not config.use_mup:
        return 1.0
    if name in FFN_FAN_IN:
        return config.intermediate_size / (config.mup_base_intermediate_size or config.intermediate_size)
    return config.hidden_size / (config.mup_base_hidden_size or config.hidden_size)


def init_std(config: TeleFLMConfig, name: str) -> float | None:
    """Initial standard deviation of parameter `name` (None: initialised to ones)."""
    kind = param_class(name)
    if kind == "vector":
        return None
    std = config.initializer_range
    if kind in HIDDEN:
        std /= math.sqrt(width_mult(config, name))
    if kind == "hidden_residual":
        std /= math.sqrt(2 * config.num_hidden_layers)
    return std


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def param_multipliers(params: Any, config: TeleFLMConfig) -> tuple[Any, Any]:
    """(Adam learning-rate multipliers, weight-decay multipliers) for every leaf of a parameter tree."""

    def lr(path, _):
        name = _leaf_name(path)
        return 1.0 / width_mult(config, name) if param_class(name) in HIDDEN else 1.0

    def wd(path, _):
        name = _leaf_name(path)
        kind = param_class(name)
        return 0.0 if kind == "vector" else (width_mult(config, name) if kind in HIDDEN else 1.0)

    return jax.tree_util.tree_map_with_path(lr, params), jax.tree_util.tree_map_with_path(wd, params)
