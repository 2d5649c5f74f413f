"""Token-level losses on float32 logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    weights_bt: jax.Array,
    z_loss: float = 0.0,
    normaliser: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted NLL sum + z_loss * weighted sum of log(Z)^2) / normaliser, and the raw sums.

    normaliser defaults to the number of weighted tokens (a mean); the z term is PaLM's logit stabiliser.
    """
    logits_btv = logits_btv.astype(jnp.float32)
    weights_bt = weights_bt.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    nll_sum = ((log_z_bt - target_logit_bt) * weights_bt).sum()
    num_tokens = weights_bt.sum()
    normaliser = jnp.maximum(num_tokens, 1.0) if normaliser is None else normaliser
    aux = {"nll_sum": nll_sum, "num_tokens": num_tokens}
    total = nll_sum
    if z_loss:
        aux["z_sum"] = (jnp.square(log_z_bt) * weights_bt).sum()
        total = total + z_loss * aux["z_sum"]
    return total / normaliser, aux
