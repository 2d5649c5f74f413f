"""Token generation from a parameter tree (the library behind `python -m flm_jax.generate`).

Greedy at temperature 0; temperature > 0 samples. Decoding uses no KV cache: the whole loop is one jitted
`lax.while_loop` over a fixed token buffer (prompt + max_new_tokens) that re-runs the full forward pass at each step
and reads the logits at the last filled position. The causal mask makes the unfilled tail irrelevant, so this
equals incremental decoding; it costs O(steps x buffer) and compiles once per buffer length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.model import TeleFLM


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy"))
def _decode(params, prompt_bp, rng, temperature, eos_id, *, config: TeleFLMConfig, max_new_tokens: int, greedy: bool):
    b, p = prompt_bp.shape
    total = p + max_new_tokens
    model = TeleFLM(config)
    buffer_bt = jnp.full((b, total), config.pad_token_id, jnp.int32).at[:, :p].set(prompt_bp)

    def unfinished(carry):
        pos, _, done_b, _ = carry
        return (pos < total) & ~jnp.all(done_b)

    def step(carry):
        pos, buffer_bt, done_b, rng = carry
        logits_btv = model.apply({"params": params}, buffer_bt)
        logits_bv = jax.lax.dynamic_index_in_dim(logits_btv, pos - 1, axis=1, keepdims=False)
        rng, key = jax.random.split(rng)
        if greedy:
            next_b = jnp.argmax(logits_bv, axis=-1)
        else:
            next_b = jax.random.categorical(key, logits_bv / temperature, axis=-1)
        next_b = jnp.where(done_b, config.pad_token_id, next_b).astype(jnp.int32)
        buffer_bt = jax.lax.dynamic_update_slice_in_dim(buffer_bt, next_b[:, None], pos, axis=1)
        return pos + 1, buffer_bt, done_b | (next_b == eos_id), rng

    carry = (jnp.int32(p), buffer_bt, jnp.zeros((b,), bool), rng)
    return jax.lax.while_loop(unfinished, step, carry)[1][:, p:]


def generate(
    params,
    config: TeleFLMConfig,
    prompt_bp: np.ndarray,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> np.ndarray:
    """New token ids [b, max_new_tokens] for equal-length prompts [b, p]; after eos_id a row holds pad ids."""
    prompt_bp = np.asarray(prompt_bp, np.int32)
    if prompt_bp.ndim != 2 or prompt_bp.shape[1] == 0:
        raise ConfigError(f"prompts must be a non-empty [batch, length] array, got shape {prompt_bp.shape}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    out = _decode(
        params,
        jnp.asarray(prompt_bp),
        jax.random.key(seed),
        jnp.float32(max(temperature, 1e-6)),
        jnp.int32(-1 if eos_id is None else eos_id),
        config=config,
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
    )
    return np.asarray(out)
