"""The language-modelling objective on a packed batch, and the jitted train and eval steps built on it."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flm_jax.config import TeleFLMConfig
from flm_jax.growth.msg import MSGRamp, masks_at
from flm_jax.losses import cross_entropy
from flm_jax.model import GrowthMasks, TeleFLM
from flm_jax.partitioning import MeshLayout, batch_sharding, replicated
from flm_jax.training.state import StateSpec, TrainState


def lm_loss(
    params: Any,
    batch: dict[str, jax.Array],
    config: TeleFLMConfig,
    z_loss: float = 0.0,
    normaliser: jax.Array | None = None,
    masks: GrowthMasks | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss (token mean unless a normaliser is given) and the summed NLL / token count. `batch` holds [batch,
    length] arrays inputs, targets, segment_ids, positions and loss_weights (flm_jax/data packs them)."""
    logits_btv = TeleFLM(config).apply(
        {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], masks
    )
    return cross_entropy(logits_btv, batch["targets"], batch["loss_weights"], z_loss, normaliser)


def make_train_step(
    config: TeleFLMConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    layout: MeshLayout,
    num_microbatches: int = 1,
    z_loss: float = 0.0,
    ramp: MSGRamp | None = None,
):
    """state, batch -> state, metrics. With microbatches, gradients are summed over equal slices of the batch,
    each normalised by the whole batch's token count, so the update equals the full-batch one. `ramp` (a grown
    checkpoint's MSG ramp) masks new structure with the ramp value of the traced step."""

    def grads_of(params, batch, num_tokens, masks):
        def loss_fn(p, mb):
            loss, aux = lm_loss(p, mb, config, z_loss, normaliser=num_tokens, masks=masks)
            return loss, aux["nll_sum"]

        if num_microbatches == 1:
            (loss, nll_sum), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
            return loss, nll_sum, grads
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:]), batch
        )

        def accumulate(carry, mb):
            (loss, nll_sum), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
            return jax.tree_util.tree_map(jnp.add, carry, (loss, nll_sum, grads)), None

        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
        return jax.lax.scan(accumulate, zeros, micro)[0]

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        with nn.logical_axis_rules(layout.flax_rules()):
            num_tokens = jnp.maximum(batch["loss_weights"].sum(), 1.0)
            masks = masks_at(ramp, config, state["step"])
            loss, nll_sum, grads = grads_of(state["params"], batch, num_tokens, masks)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.global_norm(grads)
        # A non-finite loss or gradient skips the update: parameters and optimizer state stay as they were (the
        # step count and the data stream move on). The loop counts such steps and stops a run of them.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state["params"], state["opt_state"])
        )
        metrics = {
            "loss": loss,
            "nll": nll_sum / num_tokens,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "num_tokens": num_tokens,
            "nonfinite": 1 - finite.astype(jnp.int32),
        }
        if ramp is not None:
            metrics["growth_mask"] = ramp.value(state["step"])
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def jit_train_step(
    config: TeleFLMConfig,
    spec: StateSpec,
    layout: MeshLayout,
    mesh,
    num_microbatches: int = 1,
    z_loss: float = 0.0,
    ramp: MSGRamp | None = None,
):
    """The train step as `flm_jax.train` runs it: jitted with the state's shardings in and out, the batch split
    over the mesh's batch axes, and the old state donated (its buffers hold the new one). `flm_jax.plan --compile`
    lowers this same function for a TPU slice."""
    step = make_train_step(config, spec.tx, spec.schedule, layout, num_microbatches, z_loss, ramp)
    return jax.jit(
        step,
        in_shardings=(spec.shardings, batch_sharding(mesh, layout)),
        out_shardings=(spec.shardings, replicated(mesh)),
        donate_argnums=0,
    )


def make_eval_step(config: TeleFLMConfig, layout: MeshLayout, ramp: MSGRamp | None = None):
    """params, batch, step -> (summed NLL in nats, number of target tokens)."""

    def eval_step(params, batch, step):
        with nn.logical_axis_rules(layout.flax_rules()):
            _, aux = lm_loss(params, batch, config, masks=masks_at(ramp, config, step))
        return aux["nll_sum"], aux["num_tokens"]

    return eval_step
