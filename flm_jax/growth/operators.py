"""Growth operators: pure functions (source tree, source config, target config, spec) -> target tree, for the
parameters and, with the same structure, for Adam's first (mu) and second (nu) moments. docs/growth_math.md holds
the mathematics; the comments name the rule each branch implements.

Every parameter axis belongs to a growth space (hidden, heads, kv_heads, ffn, vocab, layers) and is either read
(an input: the tensor contracts over it) or written (an output). `AXIS_ROLES` says which, per leaf name.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flm_jax.config import TeleFLMConfig
from flm_jax.growth import counter_rng
from flm_jax.growth.spec import GrowthSpec
from flm_jax.mup import init_std

# (space, role) per axis; None for axes growth never touches (head_dim). Layer-stacked leaves get a leading
# ("layers", None) axis added by `axis_roles`.
AXIS_ROLES = {
    "embed_tokens": (("vocab", "row"), ("hidden", "out")),
    "lm_head": (("hidden", "in"), ("vocab", "col")),
    "scale": (("hidden", "gain"),),
    "q_proj": (("hidden", "in"), ("heads", "out"), None),
    "k_proj": (("hidden", "in"), ("kv_heads", "out"), None),
    "v_proj": (("hidden", "in"), ("kv_heads", "out"), None),
    "o_proj": (("heads", "in"), None, ("hidden", "out")),
    "gate_proj": (("hidden", "in"), ("ffn", "out")),
    "up_proj": (("hidden", "in"), ("ffn", "out")),
    "down_proj": (("ffn", "in"), ("hidden", "out")),
}
SPACE_FIELDS = {
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "ffn": "intermediate_size",
    "vocab": "vocab_size",
}
LAYER_OUTPUTS = ("o_proj", "down_proj")  # zeroed in an exactly inserted layer: the block starts as the identity
KINDS = ("params", "mu", "nu")


def leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def axis_roles(path) -> tuple:
    roles = AXIS_ROLES[leaf_name(path)]
    stacked = any(getattr(k, "key", None) == "layers" for k in path)
    return ((("layers", None),) if stacked else ()) + roles


def _method(spec: GrowthSpec, space: str) -> str:
    return {
        "hidden": spec.hidden_method,
        "heads": spec.heads_method,
        "kv_heads": spec.heads_method,
        "ffn": spec.ffn_method,
    }.get(space, "new")


def _new_entries(
    x, axis: int, count: int, kind: str, role: str, space: str, std: float | None, spec: GrowthSpec, seed: jax.Array
):
    """`count` fresh entries along `axis`: what the operator rule says new structure starts with."""
    shape = list(x.shape)
    shape[axis] = count
    if kind == "mu":
        return jnp.zeros(shape, x.dtype)
    if kind == "nu":  # a sensible v for new entries under the shared step count (docs/growth_math.md)
        return jnp.full(shape, jnp.mean(x) if spec.new_moments == "mean" else 0.0, x.dtype)
    if role == "gain":
        return jnp.ones(shape, x.dtype)
    # Exact mode: new hidden coordinates are never written (writers' new rows are 0) and new heads / FFN units /
    # vocabulary logits are never read (their output weights are 0); readers' new inputs are free (random).
    # MSG mode: everything new is random, masks hide it. New vocabulary: embedding rows random, head columns 0.
    zero = (role == "col") or (
        spec.mode == "exact" and ((space == "hidden" and role == "out") or (space in ("heads", "ffn") and role == "in"))
    )
    if zero or std is None:
        return jnp.zeros(shape, x.dtype)
    return (std * counter_rng.normal(seed, tuple(shape))).astype(x.dtype)


def _duplicate(x, axis: int, k: int, kind: str, role: str, spec: GrowthSpec, seed: jax.Array):
    """k copies along `axis` (docs/growth_math.md, duplication): readers' copies carry W/k (+ zero-sum noise), so
    outputs are unchanged; the gradient of each copy of a written axis is 1/k of the original, hence mu/k and nu/k^2."""
    tiled = jnp.concatenate([x] * k, axis=axis)
    if kind == "params" and role == "in":
        tiled = tiled / k
        if spec.duplicate_noise:
            noise = (spec.duplicate_noise * counter_rng.normal(seed, x.shape)).astype(x.dtype)
            parts = [noise] * (k - 1) + [-(k - 1) * noise]  # sums to zero across copies
            tiled = tiled + jnp.concatenate(parts, axis=axis)
    elif role in ("out", "gain") and kind != "params":
        tiled = tiled / (k if kind == "mu" else k * k)
    return tiled


def grow_width(tree: Any, src: TeleFLMConfig, tgt: TeleFLMConfig, spec: GrowthSpec, kind: str, rng: jax.Array) -> Any:
    """Grow hidden, heads (with their kv heads), FFN and vocabulary of every leaf (layers untouched). New random
    entries come from `rng` through counter_rng (a pure function of the key, the leaf, the axis and the entry)."""
    root_seed = counter_rng.seed_from_key(rng)

    def grow_leaf(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        seed = counter_rng.fold_in(root_seed, zlib.crc32(name.encode()))
        std = init_std(tgt, leaf_name(path))
        for axis, role_spec in enumerate(axis_roles(path)):
            if role_spec is None or role_spec[0] == "layers":
                continue
            space, role = role_spec
            n, N = getattr(src, SPACE_FIELDS[space]), getattr(tgt, SPACE_FIELDS[space])
            if N == n:
                continue
            k = N // n if _method(spec, space) == "duplicate" else 1
            if k > 1:
                x = _duplicate(x, axis, k, kind, role, spec, counter_rng.fold_in(seed, 2 * axis))
            if N > k * n:
                fresh = _new_entries(
                    x, axis, N - k * n, kind, role, space, std, spec, counter_rng.fold_in(seed, 2 * axis + 1)
                )
                x = jnp.concatenate([x, fresh], axis=axis)
        if leaf_name(path) == "lm_head" and src.use_mup and tgt.mup_scale_factor != src.mup_scale_factor:
            # μP readout rule (GrowthSpec.readout='mup'): logits = output_mult / mup_scale_factor · U N(x); keep the
            # product.
            ratio = tgt.mup_scale_factor / src.mup_scale_factor
            x = x * {"params": ratio, "mu": 1 / ratio, "nu": 1 / ratio**2}[kind]
        return x

    return jax.tree_util.tree_map_with_path(grow_leaf, tree)


def grow_depth(tree: Any, order: Sequence[tuple[int, bool]], spec: GrowthSpec, kind: str) -> Any:
    """Rebuild every layer-stacked leaf as [source layer i for (i, is_new) in order]. New layers: exact mode zeroes
    their output projections (the block starts as the identity); MSG keeps the copy and gates it with a mask.
    Moments of a new layer: mu 0, nu copied from its source (or 0 with new_moments='zero')."""
    index = jnp.asarray([i for i, _ in order])
    is_new = jnp.asarray([new for _, new in order])

    def grow_leaf(path, x):
        if axis_roles(path)[0] != ("layers", None):
            return x
        y = jnp.take(x, index, axis=0)
        zero_new = (
            kind == "mu"
            or (kind == "nu" and spec.new_moments == "zero")
            or (kind == "params" and spec.mode == "exact" and leaf_name(path) in LAYER_OUTPUTS)
        )
        if zero_new:
            y = jnp.where(is_new.reshape((-1,) + (1,) * (y.ndim - 1)), 0, y)
        return y

    return jax.tree_util.tree_map_with_path(grow_leaf, tree)


def grow_tree(
    tree: Any, src: TeleFLMConfig, tgt: TeleFLMConfig, spec: GrowthSpec, order, kind: str, rng: jax.Array
) -> Any:
    """Width, then depth (new layers copy already-widened layers)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    return grow_depth(grow_width(tree, src, tgt, spec, kind, rng), order, spec, kind)


def map_adam_moments(opt_state: Any, fn: Callable[[Any, str], Any]) -> Any:
    """Apply fn(tree, 'mu'|'nu') to the moments of every ScaleByAdamState in an optax state; keep the rest."""
    import optax

    def visit(node):
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(mu=fn(node.mu, "mu"), nu=fn(node.nu, "nu"))
        return node

    return jax.tree_util.tree_map(visit, opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
