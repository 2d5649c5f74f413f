"""Token generation from a parameter tree (the library behind `python -m flm_jax.generate`).

Two decoders, one sampler:
  KV cache (default)  a prefill runs the prompts once and keeps every layer's keys and values; each step then runs
                      the model on one new token per row against the cache (flm_jax.model.KVCache), so a step
                      costs O(cache) attention instead of a whole forward pass. The cache is sharded like the
                      activations: batch over data x fsdp, kv heads over the tensor axis.
  full recompute      the reference (`kv_cache=False`): every step re-runs the whole forward pass over a fixed buffer
                      (prompt + max_new_tokens) and reads the logits at each row's last filled position; the causal
                      mask makes the unfilled tail irrelevant. O(steps x buffer), compiles once per buffer length.
Prompts may differ in length (rows are right-padded; each row continues from its own length). Sampling: greedy at
temperature 0, else softmax(logits / temperature) restricted to the top_k tokens (0: all) and to the smallest set
whose probability reaches top_p (1: all). Step i draws with fold_in(seed, i), so both decoders sample alike and a
seed reproduces its samples. A row stops at eos_id; after it the row holds pad ids.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.model import KVCache, TeleFLM
from flm_jax.params import param_shardings
from flm_jax.partitioning import MeshLayout, make_mesh


class Sampler(NamedTuple):
    """How the next token is chosen from the logits (hashable: part of the compiled decoder)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __call__(self, logits_bv: jax.Array, key: jax.Array) -> jax.Array:
        if self.temperature == 0:
            return jnp.argmax(logits_bv, axis=-1)
        logits_bv = logits_bv / self.temperature
        neg_inf = jnp.finfo(logits_bv.dtype).min
        if self.top_k:
            kth_b1 = jax.lax.top_k(logits_bv, self.top_k)[0][:, -1:]
            logits_bv = jnp.where(logits_bv < kth_b1, neg_inf, logits_bv)
        if self.top_p < 1.0:
            sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
            probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
            # Keep a token while the probability of the tokens ranked above it is below top_p (the first always).
            above_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
            cutoff_b1 = jnp.min(jnp.where(above_bv < self.top_p, sorted_bv, jnp.inf), axis=-1, keepdims=True)
            logits_bv = jnp.where(logits_bv < cutoff_b1, neg_inf, logits_bv)
        return jax.random.categorical(key, logits_bv, axis=-1)


def _step_tokens(sampler: Sampler, logits_bv, rng, step, done_b, pad_id: int, eos_id):
    next_b = sampler(logits_bv, jax.random.fold_in(rng, step))
    next_b = jnp.where(done_b, pad_id, next_b).astype(jnp.int32)
    return next_b, done_b | (next_b == eos_id)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampler"))
def _decode_cached(
    params, prompt_bp, lengths_b, rng, eos_id, *, config: TeleFLMConfig, max_new_tokens: int, sampler: Sampler
):
    b, p = prompt_bp.shape
    model = TeleFLM(config)
    segments_bp = (jnp.arange(p)[None] < lengths_b[:, None]).astype(jnp.int32)
    logits_bpv, (keys, values) = model.apply({"params": params}, prompt_bp, segments_bp, return_kv=True)
    room = ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0))  # cache positions for the new tokens
    cache = KVCache(jnp.pad(keys, room), jnp.pad(values, room), lengths_b)
    last_bv = jnp.take_along_axis(logits_bpv, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
    out_bn = jnp.full((b, max_new_tokens), config.pad_token_id, jnp.int32)

    def unfinished(carry):
        i, _, _, done_b, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_b)

    def step(carry):
        i, cache, logits_bv, done_b, out_bn = carry
        next_b, done_b = _step_tokens(sampler, logits_bv, rng, i, done_b, config.pad_token_id, eos_id)
        out_bn = jax.lax.dynamic_update_slice_in_dim(out_bn, next_b[:, None], i, axis=1)
        logits_b1v, cache = model.apply({"params": params}, next_b[:, None], kv_cache=cache)
        return i + 1, cache, logits_b1v[:, 0], done_b, out_bn

    carry = (jnp.int32(0), cache, last_bv, jnp.zeros((b,), bool), out_bn)
    return jax.lax.while_loop(unfinished, step, carry)[-1]


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampler"))
def _decode_full(
    params, prompt_bp, lengths_b, rng, eos_id, *, config: TeleFLMConfig, max_new_tokens: int, sampler: Sampler
):
    b, p = prompt_bp.shape
    model = TeleFLM(config)
    buffer_bt = jnp.pad(prompt_bp, ((0, 0), (0, max_new_tokens)), constant_values=config.pad_token_id)
    rows = jnp.arange(b)

    def unfinished(carry):
        i, _, _, done_b = carry
        return (i < max_new_tokens) & ~jnp.all(done_b)

    def step(carry):
        i, pos_b, buffer_bt, done_b = carry
        logits_btv = model.apply({"params": params}, buffer_bt)
        logits_bv = jnp.take_along_axis(logits_btv, (pos_b - 1)[:, None, None], axis=1)[:, 0]
        next_b, done_b = _step_tokens(sampler, logits_bv, rng, i, done_b, config.pad_token_id, eos_id)
        return i + 1, pos_b + 1, buffer_bt.at[rows, pos_b].set(next_b), done_b

    carry = (jnp.int32(0), lengths_b, buffer_bt, jnp.zeros((b,), bool))
    _, _, buffer_bt, _ = jax.lax.while_loop(unfinished, step, carry)
    # Row r's new tokens start at its own length.
    return jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, max_new_tokens))(buffer_bt, lengths_b)


def pad_prompts(prompts: Sequence[Sequence[int]] | np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompts [b, longest] and their lengths [b]."""
    rows = [list(map(int, r)) for r in prompts]
    if not rows or any(not r for r in rows):
        raise ConfigError(f"generate needs one or more non-empty prompts, got lengths {[len(r) for r in rows]}")
    lengths = np.asarray([len(r) for r in rows], np.int32)
    padded = np.full((len(rows), lengths.max()), pad_id, np.int32)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    return padded, lengths


def generate(
    params,
    config: TeleFLMConfig,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos_id: int | None = None,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    kv_cache: bool = True,
    layout: MeshLayout | None = None,
) -> np.ndarray:
    """New token ids [b, max_new_tokens] for prompts of any lengths (token id lists, or a [b, p] array); a row
    holds pad ids after its eos_id. With a mesh layout the parameters are placed with its shardings and decoding
    runs under its rules (the KV cache split along kv heads on the tensor axis). See the module docstring for the
    decoders and the sampler."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt_bp, lengths_b = pad_prompts(prompts, config.pad_token_id)
    decode = functools.partial(
        _decode_cached if kv_cache else _decode_full,
        config=config,
        max_new_tokens=max_new_tokens,
        sampler=Sampler(float(temperature), int(top_k), float(top_p)),
    )
    args = (
        jnp.asarray(prompt_bp),
        jnp.asarray(lengths_b),
        jax.random.key(seed),
        jnp.int32(-1 if eos_id is None else eos_id),
    )
    if layout is None:
        return np.asarray(decode(params, *args))
    mesh = make_mesh(layout)
    params = jax.device_put(params, param_shardings(config, mesh, layout))
    with jax.set_mesh(mesh), nn.logical_axis_rules(layout.flax_rules()):
        return np.asarray(decode(params, *args))
