"""Progressive growth (Tele-FLM / MSG): pure operators on parameter and optimizer-state pytrees.

    result = grow(params, src_config, GrowthSpec(...), rng, opt_state=..., start_step=step)
    result.params, result.opt_state, result.config, result.order, result.msg_state

`python -m flm_jax.grow` applies a gin-configured GrowthSpec to a checkpoint (flm_jax/grow.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax

from flm_jax.config import TeleFLMConfig
from flm_jax.growth.fold import fold_for_export
from flm_jax.growth.layer_selection import select_layers
from flm_jax.growth.msg import build_masks, growth_state, ramp_done, ramp_value
from flm_jax.growth.operators import grow_tree, map_adam_moments
from flm_jax.growth.spec import GrowthSpec, target_config


class GrowthResult(NamedTuple):
    params: Any
    opt_state: Any
    config: TeleFLMConfig
    order: list[tuple[int, bool]]
    msg_state: dict | None  # MSG mode: the mask ramp state for checkpoint metadata


def layer_order(src: TeleFLMConfig, spec: GrowthSpec, distances: Sequence[float] | None = None):
    target = spec.num_hidden_layers or src.num_hidden_layers
    return select_layers(spec.layer_strategy, src.num_hidden_layers, target, distances, spec.distance_prefer)


def grow(params: Any, src: TeleFLMConfig, spec: GrowthSpec, rng: jax.Array, opt_state: Any = None,
         distances: Sequence[float] | None = None, start_step: int = 0) -> GrowthResult:
    """Grow a parameter tree (and optionally an optax state holding Adam moments). Pure: jit it with the target
    mesh's out_shardings to grow shard by shard."""
    tgt = target_config(src, spec)
    order = layer_order(src, spec, distances)
    new_params, new_opt = grow_trees(params, opt_state, src, tgt, spec, order, rng)
    msg = growth_state(src, order, start_step, spec.ramp_steps) if spec.mode == "msg" else None
    return GrowthResult(new_params, new_opt, tgt, order, msg)


def grow_trees(params: Any, opt_state: Any, src: TeleFLMConfig, tgt: TeleFLMConfig, spec: GrowthSpec, order,
               rng: jax.Array) -> tuple[Any, Any]:
    """The array part of `grow` (parameters and Adam moments; opt_state may be None): jit-able."""
    new_params = grow_tree(params, src, tgt, spec, order, "params", rng)
    new_opt = None if opt_state is None else map_adam_moments(
        opt_state, lambda tree, kind: grow_tree(tree, src, tgt, spec, order, kind, rng))
    return new_params, new_opt


__all__ = ["GrowthResult", "GrowthSpec", "build_masks", "fold_for_export", "grow", "grow_trees", "growth_state", "layer_order",
           "ramp_done", "ramp_value", "select_layers", "target_config"]
