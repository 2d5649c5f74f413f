"""The attention cores against the einsum reference, and every remat policy against no remat: packed rows with
padding, GQA, MSG growth masks, KV-cache decoding and a sharded mesh. Splash runs in Pallas interpret mode here.

Float32 throughout; agreement is asserted to TOL of each array's largest magnitude (the cores differ only in the
order of float32 roundings: the measured gaps are around 1e-7 relative).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flm_jax.config import REMAT_POLICIES, ConfigError, TeleFLMConfig
from flm_jax.losses import cross_entropy
from flm_jax.model import GrowthMasks, KVCache, TeleFLM
from flm_jax.partitioning import make_mesh
from tests.helpers import load_layout, packed_positions, randomise

TOL = 1e-5
CONFIG = TeleFLMConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=1,  # a one-layer scan compiles in half the time; the cores and policies act per layer
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    output_mult=2.0,
    remat_policy="none",
    attention_impl="einsum",
)
IMPLS = ("lse", "dot_product", "splash")


def packed_batch(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment ids, positions) [2, length]: row 0 two documents and padding, row 1 one document."""
    segments = np.ones((2, length), np.int32)
    segments[0, length // 3 :] = 2
    segments[0, length - 5 :] = 0
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, segments.shape).astype(np.int32)
    return tokens, segments, packed_positions(segments)


def random_params(cfg: TeleFLMConfig, seed: int = 0):
    """Weights large enough for attention to be far from uniform."""
    params = TeleFLM(cfg).init(jax.random.key(seed), np.zeros((1, 8), np.int32))["params"]
    return randomise(nn.meta.unbox(params), seed)


def logits_and_grads(cfg: TeleFLMConfig, params, batch, masks: GrowthMasks | None = None):
    """Logits and the gradient of the mean next-token loss over real tokens (padding rows are undefined)."""
    tokens, segments, positions = batch

    def loss(params):
        logits = TeleFLM(cfg).apply({"params": params}, tokens, segments, positions, masks)
        weights = (segments[:, 1:] != 0) & (segments[:, 1:] == segments[:, :-1])
        return cross_entropy(logits[:, :-1], tokens[:, 1:], weights)[0], logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def assert_close(actual, expected, tol=TOL):
    """max |actual - expected| <= tol x max |expected|, leaf by leaf."""
    for (path, e), a in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree_util.tree_leaves(actual)):
        e, a = np.asarray(e), np.asarray(a)
        scale = np.abs(e).max()
        assert scale > 0, jax.tree_util.keystr(path)
        assert np.abs(a - e).max() <= tol * scale, (jax.tree_util.keystr(path), np.abs(a - e).max() / scale)


def block_masks(cfg: TeleFLMConfig) -> GrowthMasks:
    """MSG masks in the middle of a ramp (form 'block': new heads masked on q, k and v): the second kv group, the
    last hidden and FFN coordinates and the layer are new."""
    m = 0.3
    ramp = lambda size, old: jnp.where(jnp.arange(size) < old, 1.0, m)  # noqa: E731
    return GrowthMasks(
        hidden=ramp(cfg.hidden_size, 48),
        heads=ramp(cfg.num_attention_heads, 2),
        ffn=ramp(cfg.intermediate_size, 64),
        layers=jnp.array([m]),
        form="block",
    )


@pytest.fixture(scope="module")
def reference():
    """(params, batch, einsum logits, einsum gradients) without remat: GQA, 48 tokens (splash pads them to a block)."""
    params, batch = random_params(CONFIG), packed_batch(48)
    return params, batch, *logits_and_grads(CONFIG, params, batch)


def test_cores_equal_einsum_under_msg_masks(reference):
    """Logits and gradients of every core equal einsum's on packed rows with MSG masks mid-ramp."""
    params, batch = reference[:2]
    masks, real = block_masks(CONFIG), batch[1] != 0
    ref_logits, ref_grads = logits_and_grads(CONFIG, params, batch, masks)
    for impl in IMPLS:
        logits, grads = logits_and_grads(CONFIG.replace(attention_impl=impl), params, batch, masks)
        assert_close(np.asarray(logits)[real], np.asarray(ref_logits)[real])
        assert_close(grads, ref_grads)


def test_remat_policies_give_the_gradients_of_no_remat(reference):
    """Under the default core (lse, whose hand-written backward each policy must see through)."""
    params, batch, _, ref_grads = reference
    for policy in REMAT_POLICIES[1:]:  # offload_attn too: CPU devices have a pinned_host memory
        cfg = CONFIG.replace(remat_policy=policy, attention_impl=TeleFLMConfig.attention_impl)
        assert_close(logits_and_grads(cfg, params, batch)[1], ref_grads, 2e-6)


def test_splash_on_a_mesh_equals_einsum(reference):
    """Under a mesh the kernel runs in shard_map: rows over fsdp, query and kv heads over tensor (one kv group per
    device). save_attn keeps the kernel's residuals, saved under the attention output's name."""
    params, batch, ref_logits, ref_grads = reference
    layout = load_layout("fsdp_tp", mesh_shape={"fsdp": 2, "tensor": 2})
    splash = CONFIG.replace(attention_impl="splash", remat_policy="save_attn")
    with jax.set_mesh(make_mesh(layout, jax.devices()[:4])), nn.logical_axis_rules(layout.flax_rules()):
        logits, grads = logits_and_grads(splash, params, batch)
    real = batch[1] != 0
    assert_close(np.asarray(logits)[real], np.asarray(ref_logits)[real])
    assert_close(grads, ref_grads)


def decode_logits(cfg: TeleFLMConfig, params, prompts, lengths, next_tokens):
    """Logits of each row's last prompt token (prefill) and of each token of next_tokens [b, n], fed one step at a
    time through the KV cache: [b, 1 + n, v]."""
    model = TeleFLM(cfg)

    @jax.jit
    def run(params):
        segments = (jnp.arange(prompts.shape[1])[None] < lengths[:, None]).astype(jnp.int32)
        logits, (keys, values) = model.apply({"params": params}, prompts, segments, return_kv=True)
        room = ((0, 0), (0, 0), (0, next_tokens.shape[1]), (0, 0), (0, 0))
        cache = KVCache(jnp.pad(keys, room), jnp.pad(values, room), lengths)
        out = [jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]]
        for i in range(next_tokens.shape[1]):
            step_logits, cache = model.apply({"params": params}, next_tokens[:, i : i + 1], kv_cache=cache)
            out.append(step_logits[:, 0])
        return jnp.stack(out, axis=1)

    return run(params)


def test_kv_cache_decoding_equals_einsum():
    """Ragged prompts: dot_product prefills and decodes itself; splash prefills, then decodes with einsum."""
    params = random_params(CONFIG)
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, CONFIG.vocab_size, (3, 12)).astype(np.int32)
    lengths = np.array([5, 12, 1], np.int32)
    next_tokens = rng.integers(0, CONFIG.vocab_size, (3, 2)).astype(np.int32)
    expected = decode_logits(CONFIG, params, prompts, lengths, next_tokens)
    for impl in IMPLS:
        assert_close(
            decode_logits(CONFIG.replace(attention_impl=impl), params, prompts, lengths, next_tokens), expected
        )


def test_unknown_attention_impl_and_remat_policy_are_config_errors():
    with pytest.raises(
        ConfigError, match=r"attention_impl='flash'.*one of \('einsum', 'lse', 'dot_product', 'splash'\)"
    ):
        CONFIG.replace(attention_impl="flash")
    with pytest.raises(ConfigError, match=r"remat_policy='offload'.*offload_attn"):
        CONFIG.replace(remat_policy="offload")
