"""Token-level losses on float32 logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Negative log-likelihood in nats of each target token, [b, t]."""
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return log_z_bt - target_logit_bt


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean token NLL (+ z_loss * mean log(Z)^2, PaLM's stabiliser); returns (loss, aux sums)."""
    logits_btv = logits_btv.astype(jnp.float32)
    weights_bt = weights_bt.astype(jnp.float32)
    nll_bt = token_nll(logits_btv, targets_bt)
    num_tokens = jnp.maximum(weights_bt.sum(), 1.0)
    nll_sum = (nll_bt * weights_bt).sum()
    loss = nll_sum / num_tokens
    aux = {"nll_sum": nll_sum, "num_tokens": weights_bt.sum()}
    if z_loss:
        log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
        z_term = z_loss * (jnp.square(log_z_bt) * weights_bt).sum() / num_tokens
        loss = loss + z_term
        aux["z_loss"] = z_term
    return loss, aux
