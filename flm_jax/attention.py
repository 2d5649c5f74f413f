"""The attention cores of the model: q, k, v and which keys each query may see -> the attention output.

TeleFLMConfig.attention_impl picks one (config.ATTENTION_IMPLS): `einsum`, the reference (float32 scores under a
dense mask); `dot_product`, jax.nn.dot_product_attention; `splash`, the Pallas splash attention kernel (compiled
on TPU, interpreted elsewhere), which never builds the [t, s] score matrix. All agree to rounding
(tests/test_attention_impl.py). Shape suffixes as in model.py.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu import splash_attention as splash

Array = jax.Array
# The checkpoint name of each layer's attention output (remat policies save_attn and offload_attn).
ATTENTION_OUT = "attention_out"
# Splash attention tiles queries and keys in blocks of a multiple of 128; shorter rows are padded to one.
SPLASH_BLOCK = 128


def attention_mask(segment_ids_bt: Array) -> Array:
    """[b, 1, 1, t, s] boolean: causal, within one segment, and never to padding (segment id 0)."""
    t = segment_ids_bt.shape[1]
    causal_ts = jnp.tril(jnp.ones((t, t), dtype=bool))
    same_segment_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    not_padding_bs = (segment_ids_bt != 0)[:, None, :]
    return (causal_ts[None] & same_segment_bts & not_padding_bs)[:, None, None]


@flax.struct.dataclass
class AttentionMask:
    """Which keys each query may see, in the form the attention core `core` (static; ATTENTION_CORES) reads: a
    dense boolean mask [b, 1, 1, t, s] (einsum, dot_product) or the segment ids [b, t] of self-attention over the
    call's own tokens (splash: its kernel applies the causal and segment masks block by block)."""

    core: str = flax.struct.field(pytree_node=False)
    dense: Array | None = None
    segment_ids: Array | None = None


def self_attention_mask(impl: str, segment_ids_bt: Array) -> AttentionMask:
    """A call's tokens attending to each other (training, scoring, prefill): only what the core reads is built."""
    if impl == "splash":
        return AttentionMask(impl, segment_ids=segment_ids_bt)
    return AttentionMask(impl, dense=attention_mask(segment_ids_bt))


def cache_attention_mask(impl: str, positions_bt: Array, cache_size: int) -> AttentionMask:
    """Each query sees the cache up to its own position. Splash cannot serve this (its kernel attends within one
    call's keys, the queries in blocks of 128, while a decode step brings one query per row against the whole
    cache), so decoding with splash runs the einsum core."""
    dense = (jnp.arange(cache_size)[None, None, :] <= positions_bt[:, :, None])[:, None, None]
    return AttentionMask("einsum" if impl == "splash" else impl, dense=dense)


def einsum_attention(q_bthe: Array, k_bske: Array, v_bske: Array, mask: AttentionMask) -> Array:
    """The reference: scores and softmax in float32 (float64 for a float64 model) under the dense mask."""
    b, t, h, e = q_bthe.shape
    k = k_bske.shape[2]
    q_btkge = q_bthe.reshape(b, t, k, h // k, e)
    acc = jnp.promote_types(jnp.float32, q_bthe.dtype)
    scores_bkgts = jnp.einsum("btkge,bske->bkgts", q_btkge, k_bske).astype(acc) / jnp.sqrt(e).astype(acc)
    scores_bkgts = jnp.where(mask.dense, scores_bkgts, jnp.finfo(acc).min)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(q_bthe.dtype)
    out_btkge = jnp.einsum("bkgts,bske->btkge", probs_bkgts, v_bske)
    return checkpoint_name(out_btkge.reshape(b, t, h, e), ATTENTION_OUT)


def lse_attention(q_bthe: Array, k_bske: Array, v_bske: Array, mask: AttentionMask) -> Array:
    """einsum's arithmetic with a hand-written backward pass: it keeps the softmax's row maxima and sums instead of
    the probabilities and recomputes them from q and k (the flash-attention backward, unblocked), so no score-sized
    array is saved between passes. Query heads attend as [b, h, t, s] batches, each kv head repeated for its
    group: on XLA's CPU backend these batched matmuls run about 1.5x faster than einsum's grouped five-dimensional
    ones (benchmarks/train_step.py, docs/performance.md)."""
    group = q_bthe.shape[2] // k_bske.shape[2]
    k_bshe, v_bshe = (jnp.repeat(x, group, axis=2) for x in (k_bske, v_bske))
    return checkpoint_name(_lse_core(q_bthe, k_bshe, v_bshe, mask.dense[:, 0]), ATTENTION_OUT)


def _masked_scores(q_bthe: Array, k_bshe: Array, mask_b1ts: Array) -> Array:
    acc = jnp.promote_types(jnp.float32, q_bthe.dtype)
    scores_bhts = jnp.einsum("bthe,bshe->bhts", q_bthe, k_bshe, preferred_element_type=acc)
    scores_bhts = scores_bhts / jnp.sqrt(q_bthe.shape[-1]).astype(acc)
    return jnp.where(mask_b1ts, scores_bhts, jnp.finfo(acc).min)


def _lse_forward(q_bthe: Array, k_bshe: Array, v_bshe: Array, mask_b1ts: Array):
    scores_bhts = _masked_scores(q_bthe, k_bshe, mask_b1ts)
    max_bht1 = jnp.max(scores_bhts, axis=-1, keepdims=True)
    exp_bhts = jnp.exp(scores_bhts - max_bht1)
    sum_bht1 = jnp.sum(exp_bhts, axis=-1, keepdims=True)
    probs_bhts = (exp_bhts / sum_bht1).astype(q_bthe.dtype)
    out_bthe = jnp.einsum("bhts,bshe->bthe", probs_bhts, v_bshe)
    return out_bthe, (q_bthe, k_bshe, v_bshe, mask_b1ts, max_bht1, sum_bht1, out_bthe)


def _lse_backward(residuals, dout_bthe: Array):
    q_bthe, k_bshe, v_bshe, mask_b1ts, max_bht1, sum_bht1, out_bthe = residuals
    dt = q_bthe.dtype
    probs_bhts = jnp.exp(_masked_scores(q_bthe, k_bshe, mask_b1ts) - max_bht1) / sum_bht1
    dv_bshe = jnp.einsum("bhts,bthe->bshe", probs_bhts.astype(dt), dout_bthe)
    dprobs_bhts = jnp.einsum("bthe,bshe->bhts", dout_bthe, v_bshe, preferred_element_type=probs_bhts.dtype)
    # softmax's backward: the row sum of probs * dprobs equals that of out * dout.
    rowsum_bht = jnp.einsum("bthe,bthe->bht", dout_bthe, out_bthe, preferred_element_type=probs_bhts.dtype)
    dscores_bhts = probs_bhts * (dprobs_bhts - rowsum_bht[..., None])
    dscores_bhts = (dscores_bhts / jnp.sqrt(q_bthe.shape[-1]).astype(dscores_bhts.dtype)).astype(dt)
    dq_bthe = jnp.einsum("bhts,bshe->bthe", dscores_bhts, k_bshe)
    dk_bshe = jnp.einsum("bhts,bthe->bshe", dscores_bhts, q_bthe)
    return dq_bthe, dk_bshe, dv_bshe, None


_lse_core = jax.custom_vjp(lambda q, k, v, mask: _lse_forward(q, k, v, mask)[0])
_lse_core.defvjp(_lse_forward, _lse_backward)


def dot_product_attention(q_bthe: Array, k_bske: Array, v_bske: Array, mask: AttentionMask) -> Array:
    """jax.nn.dot_product_attention under the dense mask; it groups the query heads per kv head itself (GQA).
    Its softmax runs in float32 whatever the compute dtype (a float64 model too)."""
    out_bthe = jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, mask=mask.dense[:, 0], implementation=None)
    return checkpoint_name(out_bthe, ATTENTION_OUT)


def splash_attention(q_bthe: Array, k_bske: Array, v_bske: Array, mask: AttentionMask) -> Array:
    """Pallas splash attention. The kernel takes [heads, seq, head_dim] per row and unscaled scores, so q carries
    the 1/sqrt(head_dim). Rows are padded to a multiple of SPLASH_BLOCK with padding tokens (segment 0), which no
    real token attends to."""
    t, e = q_bthe.shape[1], q_bthe.shape[3]
    pad = -t % SPLASH_BLOCK
    q_bthe = (q_bthe.astype(jnp.float32) / jnp.sqrt(jnp.float32(e))).astype(q_bthe.dtype)
    q_bhte, k_bkse, v_bkse = (
        jnp.pad(x.swapaxes(1, 2), ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q_bthe, k_bske, v_bske)
    )
    segment_ids_bt = jnp.pad(mask.segment_ids, ((0, 0), (0, pad)))
    out_bhte = _per_device(_splash_rows, *k_bkse.shape[:2])(q_bhte, k_bkse, v_bkse, segment_ids_bt)
    return out_bhte[:, :, :t].swapaxes(1, 2)


def _per_device(fn, batch: int, kv_heads: int):
    """fn on each device's rows and heads. XLA cannot partition a Pallas kernel, so under a mesh it runs in
    shard_map, the batch and heads split as the activation rules split them, sequence and head_dim whole. Query
    and kv heads split alike, so each device holds whole kv groups (GQA). A dimension its mesh axes do not divide
    (a batch of one at init) stays whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    batch_axes, head_axes = nn.logical_to_mesh_axes(("act_batch", "act_heads"))
    batch_axes, head_axes = _if_divides(batch_axes, batch, mesh), _if_divides(head_axes, kv_heads, mesh)
    heads = jax.P(batch_axes, head_axes, None, None)
    # check_vma=False: pallas_call does not declare how its outputs vary over the mesh axes.
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(heads, heads, heads, jax.P(batch_axes)), out_specs=heads, check_vma=False
    )


def _if_divides(axes: str | tuple[str, ...] | None, size: int, mesh) -> str | tuple[str, ...] | None:
    """axes (one PartitionSpec entry) if the product of their sizes divides size, else None."""
    names = (axes,) if isinstance(axes, str) else axes or ()
    return axes if size % math.prod(mesh.shape[name] for name in names) == 0 else None


def _splash_rows(q_bhte: Array, k_bkse: Array, v_bkse: Array, segment_ids_bt: Array) -> Array:
    """The kernel compiled for TPU; on other backends (CPU tests) the same kernel in Pallas interpret mode."""
    compiled, interpreted = (functools.partial(_splash_kernel, interpret=i) for i in (False, True))
    return jax.lax.platform_dependent(q_bhte, k_bkse, v_bkse, segment_ids_bt, tpu=compiled, default=interpreted)


def _splash_kernel(q_bhte: Array, k_bkse: Array, v_bkse: Array, segment_ids_bt: Array, interpret: bool) -> Array:
    """Causal splash attention within segments, vmapped over rows. make_splash_mha serves GQA itself: query head i
    reads kv head i // (heads per kv head). The kernel names its output and logsumexp ATTENTION_OUT, so save_attn
    keeps both and the backward pass does not re-run the forward kernel."""
    h, t = q_bhte.shape[1:3]
    # The largest block that tiles the row: fewer, bigger grid steps keep the TPU's matrix units busier.
    block = next(size for size in (512, 256, SPLASH_BLOCK) if t % size == 0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([splash.CausalMask((t, t))] * h),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        residual_checkpoint_name=ATTENTION_OUT,
        interpret=interpret,
    )
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
        q_bhte, k_bkse, v_bkse, segment_ids_bt
    )


# TeleFLMConfig.attention_impl -> the attention core (q [b, t, h, e], k and v [b, s, k, e], mask) -> [b, t, h, e].
ATTENTION_CORES = {
    "einsum": einsum_attention,
    "lse": lse_attention,
    "dot_product": dot_product_attention,
    "splash": splash_attention,
}
