"""The Tele-FLM decoder as Flax linen modules.

Pre-norm Llama-style blocks (RMSNorm with float32 statistics, RoPE on the full head dim, SwiGLU, no biases),
untied embedding and LM head, μP multipliers (embedding x input_mult, logits x output_mult / mup_scale_factor).
The layer stack runs under `nn.scan`, so every per-layer parameter has a leading 'layers' axis and depth compiles
once. Every parameter and the main activations carry logical axis names (see partitioning.py for the table).

Shape suffixes: b batch, t/s query/key positions, d hidden, h query heads, k kv heads, g heads per kv group,
e head_dim, f FFN units, v vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flm_jax.config import TeleFLMConfig

Array = jax.Array


def _param(module: nn.Module, name: str, axes: tuple[str, ...], shape: tuple[int, ...], std: float | None):
    """A full-shape parameter with logical axis names; std None means ones (norm gains)."""
    init = nn.initializers.ones if std is None else nn.initializers.normal(stddev=std)
    dtype = jnp.dtype(module.config.param_dtype)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    config: TeleFLMConfig

    @nn.compact
    def __call__(self, x_btd: Array) -> Array:
        scale_d = _param(self, "scale", ("norm",), (x_btd.shape[-1],), None)
        x = x_btd.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(mean_square + self.config.rms_norm_eps) * scale_d.astype(jnp.float32)
        return y.astype(self.config.dtype)


def rope_cos_sin(positions_bt: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos and sin tables [b, t, e] in the Hugging Face (rotate-half) layout, computed in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthe: Array, cos_bte: Array, sin_bte: Array) -> Array:
    x = x_bthe.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_bte[:, :, None, :] + rotated * sin_bte[:, :, None, :]
    return out.astype(x_bthe.dtype)


def attention_mask(segment_ids_bt: Array) -> Array:
    """[b, 1, 1, t, s] boolean: causal, within one segment, and never to padding (segment id 0)."""
    t = segment_ids_bt.shape[1]
    causal_ts = jnp.tril(jnp.ones((t, t), dtype=bool))
    same_segment_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    not_padding_bs = (segment_ids_bt != 0)[:, None, :]
    return (causal_ts[None] & same_segment_bts & not_padding_bs)[:, None, None]


class Attention(nn.Module):
    config: TeleFLMConfig

    @nn.compact
    def __call__(self, x_btd: Array, mask: Array, cos_bte: Array, sin_bte: Array) -> Array:
        cfg = self.config
        d, h, k, e = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.initializer_range
        q_w = _param(self, "q_proj", ("embed", "heads", "head_dim"), (d, h, e), std)
        k_w = _param(self, "k_proj", ("embed", "kv_heads", "head_dim"), (d, k, e), std)
        v_w = _param(self, "v_proj", ("embed", "kv_heads", "head_dim"), (d, k, e), std)
        o_w = _param(self, "o_proj", ("heads", "head_dim", "embed"), (h, e, d), std)
        dt = cfg.dtype

        q_bthe = jnp.einsum("btd,dhe->bthe", x_btd, q_w.astype(dt))
        k_bske = jnp.einsum("bsd,dke->bske", x_btd, k_w.astype(dt))
        v_bske = jnp.einsum("bsd,dke->bske", x_btd, v_w.astype(dt))
        q_bthe = nn.with_logical_constraint(q_bthe, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        k_bske = nn.with_logical_constraint(k_bske, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        v_bske = nn.with_logical_constraint(v_bske, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        q_bthe = apply_rope(q_bthe, cos_bte, sin_bte)
        k_bske = apply_rope(k_bske, cos_bte, sin_bte)

        b, t = x_btd.shape[:2]
        q_btkge = q_bthe.reshape(b, t, k, h // k, e)
        scores_bkgts = jnp.einsum("btkge,bske->bkgts", q_btkge, k_bske).astype(jnp.float32) / jnp.sqrt(e)
        scores_bkgts = jnp.where(mask, scores_bkgts, jnp.finfo(jnp.float32).min)
        probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(dt)
        out_btkge = jnp.einsum("bkgts,bske->btkge", probs_bkgts, v_bske)
        out_bthe = out_btkge.reshape(b, t, h, e)
        out_bthe = nn.with_logical_constraint(out_bthe, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        return jnp.einsum("bthe,hed->btd", out_bthe, o_w.astype(dt))


class SwiGLU(nn.Module):
    config: TeleFLMConfig

    @nn.compact
    def __call__(self, x_btd: Array) -> Array:
        cfg = self.config
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        gate_w = _param(self, "gate_proj", ("embed", "mlp"), (d, f), std)
        up_w = _param(self, "up_proj", ("embed", "mlp"), (d, f), std)
        down_w = _param(self, "down_proj", ("mlp", "embed"), (f, d), std)
        dt = cfg.dtype
        gate_btf = jnp.einsum("btd,df->btf", x_btd, gate_w.astype(dt))
        up_btf = jnp.einsum("btd,df->btf", x_btd, up_w.astype(dt))
        hidden_btf = nn.with_logical_constraint(nn.silu(gate_btf) * up_btf, ("act_batch", "act_length", "act_mlp"))
        return jnp.einsum("btf,fd->btd", hidden_btf, down_w.astype(dt))


class DecoderLayer(nn.Module):
    """One pre-norm block; scanned, so it maps (carry, *broadcast) -> (carry, None)."""

    config: TeleFLMConfig

    @nn.compact
    def __call__(self, x_btd: Array, mask: Array, cos_bte: Array, sin_bte: Array):
        residual_axes = ("act_batch", "act_length", "act_embed")
        x_btd = nn.with_logical_constraint(x_btd, residual_axes)
        attn_in = RMSNorm(self.config, name="input_layernorm")(x_btd)
        x_btd = x_btd + Attention(self.config, name="self_attn")(attn_in, mask, cos_bte, sin_bte)
        mlp_in = RMSNorm(self.config, name="post_attention_layernorm")(x_btd)
        x_btd = x_btd + SwiGLU(self.config, name="mlp")(mlp_in)
        return nn.with_logical_constraint(x_btd, residual_axes), None


def remat_layer(policy: str) -> type[nn.Module]:
    """DecoderLayer wrapped in the configured rematerialisation policy."""
    if policy == "none":
        return DecoderLayer
    saveable = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}[policy]
    return nn.remat(DecoderLayer, policy=saveable, prevent_cse=False)


class TeleFLM(nn.Module):
    """tokens [b, t] (+ segment ids and positions for packed rows) -> logits [b, t, v] in float32."""

    config: TeleFLMConfig

    @nn.compact
    def __call__(self, tokens_bt: Array, segment_ids_bt: Array | None = None, positions_bt: Array | None = None):
        cfg = self.config
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones_like(tokens_bt)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)

        embedding_vd = _param(self, "embed_tokens", ("vocab", "embed"), (cfg.vocab_size, cfg.hidden_size),
                              cfg.initializer_range)
        x_btd = jnp.take(embedding_vd, tokens_bt, axis=0).astype(cfg.dtype) * cfg.embedding_scale
        x_btd = nn.with_logical_constraint(x_btd, ("act_batch", "act_length", "act_embed"))

        mask = attention_mask(segment_ids_bt)
        cos_bte, sin_bte = rope_cos_sin(positions_bt, cfg.head_dim, cfg.rope_theta)
        layers = nn.scan(
            remat_layer(cfg.remat_policy),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_btd, _ = layers(cfg, name="layers")(x_btd, mask, cos_bte, sin_bte)

        x_btd = RMSNorm(cfg, name="norm")(x_btd)
        head_dv = _param(self, "lm_head", ("embed", "vocab"), (cfg.hidden_size, cfg.vocab_size),
                         cfg.initializer_range)
        logits_btv = jnp.einsum("btd,dv->btv", x_btd, head_dv.astype(cfg.dtype)).astype(jnp.float32)
        logits_btv = logits_btv * cfg.logits_scale
        return nn.with_logical_constraint(logits_btv, ("act_batch", "act_length", "act_vocab"))


def init_inputs(seq_len: int = 8) -> Array:
    """A dummy token batch for `model.init` / `jax.eval_shape`."""
    return jnp.zeros((1, seq_len), dtype=jnp.int32)
