"""The train state (step, params, optimizer state), its shardings, and the jitted train and eval steps."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flm_jax.config import TeleFLMConfig
from flm_jax.growth.msg import build_masks, ramp_value
from flm_jax.partitioning import MeshLayout, replicated
from flm_jax.step import lm_loss

TrainState = dict[str, Any]  # {"step": int32 scalar, "params": tree, "opt_state": tree}


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any, mesh) -> TrainState:
    """Optimizer moments take their parameter's sharding; counters and other scalars are replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                transform_non_params=lambda _: replicated(mesh), is_leaf=is_sharding)
    return {"step": replicated(mesh), "params": param_shardings, "opt_state": opt}


def abstract_state(tx: optax.GradientTransformation, abstract_params: Any, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint restores into."""
    tree = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
            "opt_state": jax.eval_shape(tx.init, abstract_params)}
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def init_state(params: Any, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    return {"step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]), "params": params,
            "opt_state": opt_state}


def growth_masks(config: TeleFLMConfig, growth: dict | None, step):
    """MSG masks at this (traced) step, or None for a plain model."""
    return None if growth is None else build_masks(growth, config, ramp_value(growth, step))


def make_train_step(config: TeleFLMConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    layout: MeshLayout, num_microbatches: int = 1, z_loss: float = 0.0, growth: dict | None = None):
    """state, batch -> state, metrics. With microbatches, gradients are summed over equal slices of the batch,
    each normalised by the whole batch's token count, so the update equals the full-batch one. `growth` (MSG
    state from checkpoint metadata) masks new structure with the ramp value of the traced step."""

    def grads_of(params, batch, num_tokens, masks):
        def loss_fn(p, mb):
            loss, aux = lm_loss(p, mb, config, z_loss, normaliser=num_tokens, masks=masks)
            return loss, aux["nll_sum"]

        if num_microbatches == 1:
            (loss, nll_sum), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
            return loss, nll_sum, grads
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:]), batch)

        def accumulate(carry, mb):
            (loss, nll_sum), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
            return jax.tree_util.tree_map(jnp.add, carry, (loss, nll_sum, grads)), None

        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
        return jax.lax.scan(accumulate, zeros, micro)[0]

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        with nn.logical_axis_rules(layout.flax_rules()):
            num_tokens = jnp.maximum(batch["loss_weights"].sum(), 1.0)
            masks = growth_masks(config, growth, state["step"])
            loss, nll_sum, grads = grads_of(state["params"], batch, num_tokens, masks)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "nll": nll_sum / num_tokens, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state["step"]), "num_tokens": num_tokens}
        if growth is not None:
            metrics["growth_mask"] = ramp_value(growth, state["step"])
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def make_eval_step(config: TeleFLMConfig, layout: MeshLayout, growth: dict | None = None):
    """params, batch, step -> (summed NLL in nats, number of target tokens)."""

    def eval_step(params, batch, step):
        with nn.logical_axis_rules(layout.flax_rules()):
            _, aux = lm_loss(params, batch, config, masks=growth_masks(config, growth, step))
        return aux["nll_sum"], aux["num_tokens"]

    return eval_step
