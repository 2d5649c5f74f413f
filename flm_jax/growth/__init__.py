"""Progressive growth (Tele-FLM / MSG): pure operators on parameter and optimizer-state pytrees.

    result = grow(params, src_config, GrowthSpec(...), rng, opt_state=..., start_step=step)
    result.params, result.opt_state, result.config, result.order, result.ramp

`grow` is the one growth pipeline: `flm_jax.growth.checkpoint.grow_checkpoint` (behind `python -m flm_jax.grow`
and the schedule) calls it on a restored checkpoint with the target mesh's shardings. The mathematics is in
docs/growth_math.md; `fold` turns a grown checkpoint into a plain model, `calibration` measures layer distances and
function preservation on a probe batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from flm_jax.config import TeleFLMConfig
from flm_jax.growth.layer_selection import select_layers
from flm_jax.growth.msg import MSGRamp
from flm_jax.growth.operators import grow_tree, map_adam_moments
from flm_jax.growth.spec import GrowthSpec, target_config


class GrowthResult(NamedTuple):
    params: Any
    opt_state: Any
    config: TeleFLMConfig
    order: list[tuple[int, bool]]  # (source layer, is new) per layer of the grown stack
    ramp: MSGRamp | None  # MSG mode: the mask ramp, for checkpoint metadata and the next run's train step


def layer_order(src: TeleFLMConfig, spec: GrowthSpec, distances: Sequence[float] | None = None):
    target = spec.num_hidden_layers or src.num_hidden_layers
    return select_layers(spec.layer_strategy, src.num_hidden_layers, target, distances, spec.distance_prefer)


def grow(
    params: Any,
    src: TeleFLMConfig,
    spec: GrowthSpec,
    rng: jax.Array,
    opt_state: Any = None,
    distances: Sequence[float] | None = None,
    start_step: int = 0,
    shardings: Any = None,
) -> GrowthResult:
    """Grow a parameter tree (and optionally an optax state holding Adam moments), in one jax.jit. With
    `shardings` (the target (params, opt_state) shardings) those are its out_shardings, so each device computes
    only its shards; call it under the target mesh."""
    tgt = target_config(src, spec)
    order = layer_order(src, spec, distances)

    def grow_arrays(params, opt_state):
        new_params = grow_tree(params, src, tgt, spec, order, "params", rng)
        new_opt = (
            None
            if opt_state is None
            else map_adam_moments(opt_state, lambda tree, kind: grow_tree(tree, src, tgt, spec, order, kind, rng))
        )
        return new_params, new_opt

    # Compiled even on one device: run op by op, every operation of every leaf's shape compiled on its own.
    grow_arrays = jax.jit(grow_arrays) if shardings is None else jax.jit(grow_arrays, out_shardings=shardings)
    new_params, new_opt = grow_arrays(params, opt_state)
    ramp = MSGRamp.after_growth(src, order, start_step, spec.ramp_steps, spec.msg_form) if spec.mode == "msg" else None
    return GrowthResult(new_params, new_opt, tgt, order, ramp)


__all__ = ["GrowthResult", "GrowthSpec", "MSGRamp", "grow", "layer_order", "select_layers", "target_config"]
