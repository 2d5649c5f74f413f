"""The train state (step, params, optimizer state): its optimizer, shardings and abstract tree."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flm_jax.config import TeleFLMConfig
from flm_jax.optim import OptimizerConfig, make_optimizer
from flm_jax.params import boxed_abstract_params, param_shardings
from flm_jax.partitioning import MeshLayout, replicated

TrainState = dict[str, Any]  # {"step": int32 scalar, "params": tree, "opt_state": tree}


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any, mesh) -> TrainState:
    """Optimizer moments take their parameter's sharding; counters and other scalars are replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    opt = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=is_sharding,
    )
    return {"step": replicated(mesh), "params": param_shardings, "opt_state": opt}


def abstract_state(tx: optax.GradientTransformation, abstract_params: Any, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint restores into."""
    tree = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": jax.eval_shape(tx.init, abstract_params),
    }
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def init_state(params: Any, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    return {
        "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
        "params": params,
        "opt_state": opt_state,
    }


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Everything about a train state except its values: optimizer, schedule, shardings, abstract tree."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState
    abstract: TrainState

    @classmethod
    def build(
        cls,
        model_cfg: TeleFLMConfig,
        optimizer_cfg: OptimizerConfig,
        mesh,
        layout: MeshLayout,
        total_steps: int,
        start_step: int = 0,
    ) -> StateSpec:
        with nn.logical_axis_rules(layout.flax_rules()):
            abstract_params = nn.meta.unbox(boxed_abstract_params(model_cfg))
        tx, schedule = make_optimizer(abstract_params, model_cfg, optimizer_cfg, total_steps, start_step)
        shardings = state_shardings(tx, abstract_params, param_shardings(model_cfg, mesh, layout), mesh)
        return cls(tx, schedule, shardings, abstract_state(tx, abstract_params, shardings))
