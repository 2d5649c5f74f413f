"""The random numbers growth draws for new entries: counter-based, each value a hash of a seed and its own
coordinates in the array.

Why not jax.random: XLA:CPU compiled every threefry call site in ~0.16 s, and growth has one per grown axis of
every leaf, so compiling `flm_jax.growth.grow` took ~4.4 s of which ~4.1 s was random number generation (a 28M
model; the rest of the growth compiled in 0.3 s), and threefry drew ~85M normals/s on two cores. Here a value is
murmur3's 32-bit finaliser applied once per axis to (running hash XOR coordinate x an odd constant), so every value
depends on every coordinate, a few integer operations each. Like partitionable threefry, the result does not depend
on how the array is sharded: each device hashes the global coordinates of its own shard (iota), with no
communication and no full-size buffer anywhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

_GOLDEN = 0x9E3779B9  # odd, so multiplying by it permutes uint32; spreads neighbouring coordinates apart


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's finaliser: a bijection of uint32 in which every input bit flips every output bit with
    probability ~1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def seed_from_key(key: jax.Array) -> jax.Array:
    """A uint32 seed from a jax.random key (any implementation: all words of its key data count)."""
    h = jnp.uint32(_GOLDEN)
    for word in jax.random.key_data(key).reshape(-1).astype(jnp.uint32):
        h = _fmix32(h ^ word)
    return h


def fold_in(seed: jax.Array, value: int) -> jax.Array:
    """A seed for a sub-stream named by a Python int (a leaf's hash, an axis): distinct values, unrelated seeds."""
    return _fmix32(seed ^ _fmix32(jnp.uint32((value + _GOLDEN) & 0xFFFFFFFF)))


def to_normal(h: jax.Array) -> jax.Array:
    """uint32 hashes -> float32 standard normals: the top 23 bits as an odd multiple of 2^-23 in (-1, 1), exact in
    float32 (so never ±1, where erf_inv is infinite), through the inverse normal CDF (|values| <= 5.3)."""
    odd = ((h >> 9).astype(jnp.int32) * 2 + (1 - (1 << 23))).astype(jnp.float32)
    return math.sqrt(2.0) * lax.erf_inv(odd * (1.0 / (1 << 23)))


def normal(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 standard normals of `shape`, each from the hash of the seed and its coordinates."""
    h = jnp.broadcast_to(seed, shape)
    for axis in range(len(shape)):  # a value depends on its coordinates only: a slice of a larger draw is the same
        h = _fmix32(h ^ (lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(_GOLDEN)))
    return to_normal(h)
