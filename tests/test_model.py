"""The linen model against an independent numpy implementation of the Tele-FLM math (docs/paper.md §1)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flm_jax.config import TeleFLMConfig
from flm_jax.model import TeleFLM
from tests.helpers import packed_positions, randomise


def reference_logits(p, tokens, segment_ids, positions, cfg):
    """Tele-FLM forward in float64 numpy, written from the paper, sharing no code with flm_jax."""
    n_heads, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * g

    def rope(x, pos):  # x [t, heads, hd]; Llama rotate-half pairing (i, i + hd/2)
        freq = cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)
        ang = pos[:, None] * freq[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    out = []
    for b in range(tokens.shape[0]):
        seg, pos = segment_ids[b], positions[b].astype(np.float64)
        T = len(seg)
        allowed = np.array([[j <= i and seg[i] == seg[j] and seg[j] != 0 for j in range(T)] for i in range(T)])
        x = p["embed"][tokens[b]] * cfg.input_mult
        for layer in range(cfg.num_hidden_layers):
            h = rms(x, p["ln1"][layer])
            q = rope((h @ p["wq"][layer].reshape(cfg.hidden_size, -1)).reshape(T, n_heads, hd), pos)
            k = rope((h @ p["wk"][layer].reshape(cfg.hidden_size, -1)).reshape(T, n_kv, hd), pos)
            v = (h @ p["wv"][layer].reshape(cfg.hidden_size, -1)).reshape(T, n_kv, hd)
            heads = []
            for i in range(n_heads):
                j = i // (n_heads // n_kv)  # query head i reads kv head j
                s = q[:, i] @ k[:, j].T / np.sqrt(hd)
                w = np.where(allowed, np.exp(s - s.max(-1, keepdims=True)), 0.0)
                w /= np.maximum(w.sum(-1, keepdims=True), 1e-300)  # a padding row attends to nothing
                heads.append(w @ v[:, j])
            x = x + np.concatenate(heads, -1) @ p["wo"][layer].reshape(-1, cfg.hidden_size)
            h = rms(x, p["ln2"][layer])
            g = h @ p["wg"][layer]
            x = x + ((g / (1 + np.exp(-g))) * (h @ p["wu"][layer])) @ p["wd"][layer]
        out.append(rms(x, p["norm"]) @ p["head"] * (cfg.output_mult / cfg.mup_scale_factor))
    return np.stack(out)


def numpy_params(params):
    a = lambda x: np.asarray(x, np.float64)  # noqa: E731
    layers = params["layers"]
    return dict(
        embed=a(params["embed_tokens"]),
        head=a(params["lm_head"]),
        norm=a(params["norm"]["scale"]),
        ln1=a(layers["input_layernorm"]["scale"]),
        ln2=a(layers["post_attention_layernorm"]["scale"]),
        wq=a(layers["self_attn"]["q_proj"]),
        wk=a(layers["self_attn"]["k_proj"]),
        wv=a(layers["self_attn"]["v_proj"]),
        wo=a(layers["self_attn"]["o_proj"]),
        wg=a(layers["mlp"]["gate_proj"]),
        wu=a(layers["mlp"]["up_proj"]),
        wd=a(layers["mlp"]["down_proj"]),
    )


PACKED_SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0], [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_logits_match_numpy_reference(kv_heads):
    cfg = TeleFLMConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32,
        input_mult=1.7,
        output_mult=0.5,
        mup_scale_factor=4.0,
        rope_theta=500.0,
        remat_policy="none",
    )
    model = TeleFLM(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, PACKED_SEGMENTS.shape).astype(np.int32)
    positions = packed_positions(PACKED_SEGMENTS)
    params = randomise(nn.meta.unbox(model.init(jax.random.key(1), tokens)["params"]), seed=2)

    logits = model.apply({"params": params}, tokens, PACKED_SEGMENTS, positions)
    expected = reference_logits(numpy_params(params), tokens, PACKED_SEGMENTS, positions, cfg)
    real = PACKED_SEGMENTS != 0  # padding rows attend to nothing: their values are undefined
    assert logits.dtype == jnp.float32
    assert np.abs(expected[real]).max() > 0.1  # the comparison is not vacuous
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=1e-5, rtol=1e-5)


def test_segments_do_not_interact():
    """Changing one packed document leaves the logits of the other documents in the row unchanged."""
    cfg = TeleFLMConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    model = TeleFLM(cfg)
    segments = PACKED_SEGMENTS[:1]
    positions = packed_positions(segments)
    tokens = np.arange(12, dtype=np.int32)[None] + 3
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    changed = tokens.copy()
    changed[0, 4:9] = 7  # rewrite segment 2
    a = model.apply({"params": params}, tokens, segments, positions)
    b = model.apply({"params": params}, changed, segments, positions)
    np.testing.assert_array_equal(np.asarray(a)[0, :4], np.asarray(b)[0, :4])
    np.testing.assert_array_equal(np.asarray(a)[0, 9:11], np.asarray(b)[0, 9:11])
    assert np.abs(np.asarray(a)[0, 4:9] - np.asarray(b)[0, 4:9]).max() > 1e-4


def test_bf16_compute_keeps_float32_logits_close_to_float32():
    """(Remat policies against no remat: tests/test_attention_impl.py.)"""
    base = TeleFLMConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=16,
        remat_policy="none",
    )
    tokens = (np.arange(16, dtype=np.int32)[None] * 5) % 64
    params = nn.meta.unbox(TeleFLM(base).init(jax.random.key(0), tokens)["params"])
    bf16 = TeleFLM(base.replace(dtype="bfloat16"))
    logits_bf16 = bf16.apply({"params": params}, tokens)
    logits_f32 = TeleFLM(base).apply({"params": params}, tokens)
    assert logits_bf16.dtype == jnp.float32  # logits always come back in float32
    assert 0 < np.abs(np.asarray(logits_bf16) - np.asarray(logits_f32)).max() < 0.05
