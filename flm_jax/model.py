"""The Tele-FLM decoder as Flax linen modules.

Pre-norm Llama-style blocks (RMSNorm with float32 statistics, RoPE on the full head dim, SwiGLU, no biases),
untied embedding and LM head, μP multipliers (embedding x input_mult, logits x output_mult / mup_scale_factor).
The layer stack runs under `nn.scan`, so every per-layer parameter has a leading 'layers' axis and depth compiles
once. Every parameter and the main activations carry logical axis names (see partitioning.py for the table).
Attention itself (q, k, v and a mask -> output) is one of flm_jax.attention's cores, chosen by
TeleFLMConfig.attention_impl.

Shape suffixes: b batch, t/s query/key positions, d hidden, h query heads, k kv heads, g heads per kv group,
e head_dim, f FFN units, v vocab.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from flm_jax.attention import (
    ATTENTION_CORES,
    ATTENTION_OUT,
    AttentionMask,
    cache_attention_mask,
    self_attention_mask,
)
from flm_jax.config import TeleFLMConfig
from flm_jax.mup import init_std

Array = jax.Array


def stats_dtype(config: TeleFLMConfig):
    """Norm statistics, RoPE, softmax and logits run in float32, or float64 when the model computes in float64."""
    return jnp.promote_types(jnp.float32, config.dtype)


def _param(module: nn.Module, name: str, axes: tuple[str, ...], shape: tuple[int, ...]):
    """A full-shape parameter with logical axis names, initialised as its μP class says (flm_jax/mup.py)."""
    std = init_std(module.config, name)
    init = nn.initializers.ones if std is None else nn.initializers.normal(stddev=std)
    dtype = jnp.dtype(module.config.param_dtype)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


@flax.struct.dataclass
class GrowthMasks:
    """MSG masks of a model in the middle of a growth ramp (flm_jax/growth/msg.py builds them): 1 on structure
    the model had before growing, the ramp value m on new structure. `form` (static) says where they apply
    (flm_jax.growth.spec.MSG_FORMS): 'sublayer' masks new heads and FFN units on their outputs and gates a new
    layer's attention and MLP outputs one by one; 'block' masks new heads on Q, K and V, new FFN units before the
    activation, and blends a new layer whole, m·block(h) + (1-m)·h."""

    hidden: Array  # [d]
    heads: Array  # [h]
    ffn: Array  # [f]
    layers: Array  # [num_layers]
    form: str = flax.struct.field(pytree_node=False, default="sublayer")


class KVCache(NamedTuple):
    """Every layer's keys and values for incremental decoding, and how many positions of each row are filled (the
    position of that row's next token). Rows may hold prompts of different lengths."""

    keys: Array  # [layers, b, s, k, e]
    values: Array  # [layers, b, s, k, e]
    lengths: Array  # [b] int32


def write_rows(cache_bske: Array, new_btke: Array, start_b: Array) -> Array:
    """cache with each row's new entries written at that row's own start position."""
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))(cache_bske, new_btke, start_b)


class RMSNorm(nn.Module):
    config: TeleFLMConfig

    @nn.compact
    def __call__(self, x_btd: Array, hidden_mask_d: Array | None = None) -> Array:
        """With a hidden mask, the mean square runs over masked-in coordinates only (MSG) and new coordinates
        of the output are scaled by their mask."""
        scale_d = _param(self, "scale", ("norm",), (x_btd.shape[-1],))
        x = x_btd.astype(stats_dtype(self.config))
        if hidden_mask_d is None:
            mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        else:
            mean_square = (jnp.square(x) @ hidden_mask_d)[..., None] / jnp.sum(hidden_mask_d)
        y = x * jax.lax.rsqrt(mean_square + self.config.rms_norm_eps) * scale_d.astype(x.dtype)
        if self.config.rms_norm_scale != 1.0:
            y = y * self.config.rms_norm_scale
        if hidden_mask_d is not None:
            y = y * hidden_mask_d
        return y.astype(self.config.dtype)


def token_matmul(x: Array, w: Array, contract: int = 1) -> Array:
    """x [b, t, *in] times w [*in, *out] -> [b, t, *out], the last `contract` axes of x against the first of w, as
    one 2-D matmul [b·t, in] x [in, out]. Autodiff then differentiates 2-D matmuls, whose weight gradients XLA's
    CPU backend runs without the transposed copies a [b, t, d] einsum's gradient costs (about half the time of an
    MLP's backward pass; benchmarks/train_step.py). The merged b·t axis keeps the batch sharding (the length axis
    is never sharded: partitioning.py)."""
    lead, inner, outer = x.shape[:-contract], x.shape[-contract:], w.shape[contract:]
    size = math.prod(inner)
    return jnp.dot(x.reshape(-1, size), w.reshape(size, -1)).reshape(*lead, *outer)


def rope_cos_sin(positions_bt: Array, head_dim: int, theta: float, dtype=jnp.float32) -> tuple[Array, Array]:
    """cos and sin tables [b, t, e] in the Hugging Face (rotate-half) layout, computed in `dtype`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    angles = positions_bt.astype(dtype)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthe: Array, cos_bte: Array, sin_bte: Array) -> Array:
    x = x_bthe.astype(cos_bte.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_bte[:, :, None, :] + rotated * sin_bte[:, :, None, :]
    return out.astype(x_bthe.dtype)


class Attention(nn.Module):
    config: TeleFLMConfig

    @nn.compact
    def __call__(
        self,
        x_btd: Array,
        mask: AttentionMask,
        cos_bte: Array,
        sin_bte: Array,
        heads_mask_h: Array | None = None,
        cache: tuple[Array, Array] | None = None,
        cache_lengths_b: Array | None = None,
        mask_qkv: bool = False,
    ) -> tuple[Array, tuple[Array, Array]]:
        """-> (output, (keys, values)). With a cache (one layer's keys and values [b, s, k, e]), this call's keys and
        values are written at each row's cache length and the queries attend over the whole cache; the returned keys
        and values are then the updated cache. mask says which positions count and which attention core runs. A
        heads mask scales each head's output, or its queries, keys and values with mask_qkv (new heads come in whole
        kv groups)."""
        cfg = self.config
        d, h, k, e = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_w = _param(self, "q_proj", ("embed", "heads", "head_dim"), (d, h, e))
        k_w = _param(self, "k_proj", ("embed", "kv_heads", "head_dim"), (d, k, e))
        v_w = _param(self, "v_proj", ("embed", "kv_heads", "head_dim"), (d, k, e))
        o_w = _param(self, "o_proj", ("heads", "head_dim", "embed"), (h, e, d))
        dt = cfg.dtype

        q_bthe = token_matmul(x_btd, q_w.astype(dt))
        k_bske = token_matmul(x_btd, k_w.astype(dt))
        v_bske = token_matmul(x_btd, v_w.astype(dt))
        if heads_mask_h is not None and mask_qkv:
            kv_mask_k = heads_mask_h.reshape(k, h // k)[:, 0]
            q_bthe = q_bthe * heads_mask_h[:, None].astype(dt)
            k_bske = k_bske * kv_mask_k[:, None].astype(dt)
            v_bske = v_bske * kv_mask_k[:, None].astype(dt)
        q_bthe = nn.with_logical_constraint(q_bthe, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        k_bske = nn.with_logical_constraint(k_bske, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        v_bske = nn.with_logical_constraint(v_bske, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        q_bthe = apply_rope(q_bthe, cos_bte, sin_bte)
        k_bske = apply_rope(k_bske, cos_bte, sin_bte)
        if cache is not None:
            cache_axes = ("act_batch", "act_length", "act_kv_heads", "act_head_dim")  # heads on the tensor axis
            k_bske = nn.with_logical_constraint(write_rows(cache[0], k_bske, cache_lengths_b), cache_axes)
            v_bske = nn.with_logical_constraint(write_rows(cache[1], v_bske, cache_lengths_b), cache_axes)

        out_bthe = ATTENTION_CORES[mask.core](q_bthe, k_bske, v_bske, mask)
        if heads_mask_h is not None and not mask_qkv:
            out_bthe = out_bthe * heads_mask_h[:, None].astype(dt)
        out_bthe = nn.with_logical_constraint(out_bthe, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        return token_matmul(out_bthe, o_w.astype(dt), contract=2), (k_bske, v_bske)


class SwiGLU(nn.Module):
    config: TeleFLMConfig

    @nn.compact
    def __call__(self, x_btd: Array, ffn_mask_f: Array | None = None, mask_inputs: bool = False) -> Array:
        """An FFN mask scales each unit's output, or its gate and up projections with mask_inputs (before the
        activation)."""
        cfg = self.config
        d, f = cfg.hidden_size, cfg.intermediate_size
        gate_w = _param(self, "gate_proj", ("embed", "mlp"), (d, f))
        up_w = _param(self, "up_proj", ("embed", "mlp"), (d, f))
        down_w = _param(self, "down_proj", ("mlp", "embed"), (f, d))
        dt = cfg.dtype
        gate_btf = token_matmul(x_btd, gate_w.astype(dt))
        up_btf = token_matmul(x_btd, up_w.astype(dt))
        if ffn_mask_f is not None and mask_inputs:
            gate_btf, up_btf = gate_btf * ffn_mask_f.astype(dt), up_btf * ffn_mask_f.astype(dt)
        hidden_btf = nn.silu(gate_btf) * up_btf
        if ffn_mask_f is not None and not mask_inputs:
            hidden_btf = hidden_btf * ffn_mask_f.astype(dt)
        hidden_btf = nn.with_logical_constraint(hidden_btf, ("act_batch", "act_length", "act_mlp"))
        return token_matmul(hidden_btf, down_w.astype(dt))


class DecoderLayer(nn.Module):
    """One pre-norm block; scanned, so it maps (carry, *broadcast, *per-layer) -> (carry, per-layer output): the
    layer's keys and values when decoding (return_kv, or a cache given), else None."""

    config: TeleFLMConfig
    record_internals: bool = False
    return_kv: bool = False

    @nn.compact
    def __call__(
        self,
        x_btd: Array,
        mask: AttentionMask,
        cos_bte: Array,
        sin_bte: Array,
        masks: GrowthMasks | None,
        cache_lengths_b: Array | None,
        layer_gate: Array,
        cache: tuple[Array, Array] | None,
    ):
        """layer_gate (a scalar, this layer's slice of masks.layers) blends a new layer in: x + m·attn, then + m·mlp
        (form 'sublayer'), or x + m·(block(x) - x) (form 'block')."""
        residual_axes = ("act_batch", "act_length", "act_embed")
        hidden, heads, ffn = (None, None, None) if masks is None else (masks.hidden, masks.heads, masks.ffn)
        whole_block = masks is not None and masks.form == "block"
        # Writers' new hidden coordinates are masked; the sublayer form also gates each sublayer here.
        out_mask = None if masks is None else (hidden if whole_block else hidden * layer_gate)
        x_btd = nn.with_logical_constraint(x_btd, residual_axes)
        x_in = x_btd
        attn_in = RMSNorm(self.config, name="input_layernorm")(x_btd, hidden)
        attn_out, kv = Attention(self.config, name="self_attn")(
            attn_in, mask, cos_bte, sin_bte, heads, cache, cache_lengths_b, whole_block
        )
        if masks is not None:
            attn_out = attn_out * out_mask.astype(attn_out.dtype)
        x_btd = x_btd + attn_out
        mlp_in = RMSNorm(self.config, name="post_attention_layernorm")(x_btd, hidden)
        mlp_out = SwiGLU(self.config, name="mlp")(mlp_in, ffn, whole_block)
        if masks is not None:
            mlp_out = mlp_out * out_mask.astype(mlp_out.dtype)
        if whole_block:
            x_btd = x_in + (attn_out + mlp_out) * layer_gate.astype(mlp_out.dtype)
        else:
            x_btd = x_btd + mlp_out
        if self.record_internals:
            for name, value in (("attn_out", attn_out), ("mlp_out", mlp_out), ("residual", x_btd)):
                _sow_rms(self, name, value)
            # How much this layer changes the hidden state, 1 - cos(h_in, h_out) (distance-based layer selection).
            a, b = x_in.astype(jnp.float32), x_btd.astype(jnp.float32)
            cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-9)
            self.sow("intermediates", "cos_distance", jnp.mean(1.0 - cos))
        kv_out = kv if self.return_kv or cache is not None else None
        return nn.with_logical_constraint(x_btd, residual_axes), kv_out


def _sow_rms(module: nn.Module, name: str, x: Array) -> None:
    """Record sqrt(mean(x^2)) in the 'intermediates' collection (μP coordinate checks)."""
    module.sow("intermediates", f"{name}_rms", jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))


def remat_layer(policy: str) -> type[nn.Module]:
    """DecoderLayer wrapped in the configured rematerialisation policy (config.REMAT_POLICIES says what each keeps)."""
    if policy == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=checkpoint_policy(policy), prevent_cse=False)


def checkpoint_policy(policy: str):
    """The jax.checkpoint policy of a remat policy other than 'none' (None saves nothing but the layer input)."""
    policies = jax.checkpoint_policies
    return {
        "full": None,
        "dots": policies.checkpoint_dots,
        "minimal": policies.checkpoint_dots_with_no_batch_dims,
        "save_attn": policies.save_only_these_names(ATTENTION_OUT),
        "offload_attn": policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=[ATTENTION_OUT],
            offload_src="device",
            offload_dst="pinned_host",
        ),
    }[policy]


class TeleFLM(nn.Module):
    """tokens [b, t] (+ segment ids and positions for packed rows) -> logits [b, t, v] in float32 (float64 for a
    float64 model).

    record_internals=True sows per-layer statistics into the 'intermediates' collection (RMS of the embedding,
    each layer's attention / MLP output and residual stream, and the logits; each layer's 1 - cos(h_in, h_out)).
    Only μP coordinate checks and growth calibration ask for them; training never computes them.

    Decoding (flm_jax/inference/generate.py): `return_kv=True` also returns this call's keys and values of every
    layer [layers, b, t, k, e] (a prefill); a `kv_cache` continues from it: `tokens_bt` are each row's next tokens,
    placed at the row's cache length, and the call returns (logits, the updated KVCache).
    """

    config: TeleFLMConfig
    record_internals: bool = False

    @nn.compact
    def __call__(
        self,
        tokens_bt: Array,
        segment_ids_bt: Array | None = None,
        positions_bt: Array | None = None,
        masks: GrowthMasks | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
    ):
        cfg = self.config
        if kv_cache is not None:  # positions continue each row; keys count up to the query's own position
            positions_bt = kv_cache.lengths[:, None] + jnp.arange(tokens_bt.shape[1])[None]
            mask = cache_attention_mask(cfg.attention_impl, positions_bt, kv_cache.keys.shape[2])
        else:
            if segment_ids_bt is None:
                segment_ids_bt = jnp.ones_like(tokens_bt)
            if positions_bt is None:
                positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
            mask = self_attention_mask(cfg.attention_impl, segment_ids_bt)

        embedding_vd = _param(self, "embed_tokens", ("vocab", "embed"), (cfg.vocab_size, cfg.hidden_size))
        x_btd = jnp.take(embedding_vd, tokens_bt, axis=0).astype(cfg.dtype) * cfg.embedding_scale
        if masks is not None:
            x_btd = x_btd * masks.hidden.astype(x_btd.dtype)
        x_btd = nn.with_logical_constraint(x_btd, ("act_batch", "act_length", "act_embed"))
        if self.record_internals:
            _sow_rms(self, "embedding", x_btd)

        cos_bte, sin_bte = rope_cos_sin(positions_bt, cfg.head_dim, cfg.rope_theta, stats_dtype(cfg))
        layers = nn.scan(
            remat_layer(cfg.remat_policy),
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 5 + (0, 0),
            length=cfg.num_hidden_layers,
            unroll=cfg.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        gates = jnp.ones(cfg.num_hidden_layers, jnp.float32) if masks is None else masks.layers
        cache = None if kv_cache is None else (kv_cache.keys, kv_cache.values)
        lengths = None if kv_cache is None else kv_cache.lengths
        x_btd, kv = layers(cfg, self.record_internals, return_kv, name="layers")(
            x_btd, mask, cos_bte, sin_bte, masks, lengths, gates, cache
        )

        x_btd = RMSNorm(cfg, name="norm")(x_btd, None if masks is None else masks.hidden)
        head_dv = _param(self, "lm_head", ("embed", "vocab"), (cfg.hidden_size, cfg.vocab_size))
        logits_btv = token_matmul(x_btd, head_dv.astype(cfg.dtype)).astype(stats_dtype(cfg))
        logits_btv = logits_btv * cfg.logits_scale
        if self.record_internals:
            _sow_rms(self, "logits", logits_btv)
        logits_btv = nn.with_logical_constraint(logits_btv, ("act_batch", "act_length", "act_vocab"))
        if kv_cache is not None:
            return logits_btv, KVCache(kv[0], kv[1], kv_cache.lengths + tokens_bt.shape[1])
        return (logits_btv, kv) if return_kv else logits_btv


def init_inputs(seq_len: int = 8) -> Array:
    """A dummy token batch for `model.init` / `jax.eval_shape`."""
    return jnp.zeros((1, seq_len), dtype=jnp.int32)
