"""KV-cache decoding against the full-recompute reference: token for token, ragged batches, a grown model, sampling,
and a sharded mesh."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.growth import GrowthSpec, grow
from flm_jax.inference.generate import Sampler, generate
from flm_jax.model import TeleFLM
from tests.helpers import load_layout

# GQA (2 query heads per kv head) and a large output multiplier, so the logits are peaked enough for greedy
# decoding to depend on every layer.
CONFIG = TeleFLMConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=128,
    output_mult=4.0,
    remat_policy="none",
)
PROMPTS = [[5, 17, 200, 3, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [77], [9, 8, 7]]


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(TeleFLM(CONFIG).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])


def test_kv_cache_equals_full_recompute_for_prompts_of_different_lengths(params):
    cached = generate(params, CONFIG, PROMPTS, 24)
    full = generate(params, CONFIG, PROMPTS, 24, kv_cache=False)
    np.testing.assert_array_equal(cached, full)
    assert cached.shape == (4, 24) and len({tuple(r) for r in cached.tolist()}) == 4
    for row, prompt in zip(cached, PROMPTS):  # a row decodes the same alone as in the batch
        np.testing.assert_array_equal(generate(params, CONFIG, [prompt], 24)[0], row)


def test_kv_cache_equals_full_recompute_on_a_grown_plain_model(params):
    """Exact growth (hidden zero padding: rms_norm_scale != 1, new heads, FFN units and a layer): a plain model of
    the grown shape, decoded both ways, and still the source's tokens."""
    spec = GrowthSpec(hidden_size=96, num_attention_heads=12, intermediate_size=128, num_hidden_layers=3, mode="exact")
    grown = grow(params, CONFIG, spec, jax.random.key(1))
    assert grown.config.rms_norm_scale != 1.0 and grown.ramp is None
    cached = generate(grown.params, grown.config, PROMPTS, 16)
    np.testing.assert_array_equal(cached, generate(grown.params, grown.config, PROMPTS, 16, kv_cache=False))
    np.testing.assert_array_equal(cached, generate(params, CONFIG, PROMPTS, 16))


def test_sampling_is_reproducible_and_both_decoders_sample_alike(params):
    kwargs = dict(temperature=0.9, top_k=40, top_p=0.95)
    a = generate(params, CONFIG, PROMPTS, 16, seed=3, **kwargs)
    np.testing.assert_array_equal(a, generate(params, CONFIG, PROMPTS, 16, seed=3, **kwargs))
    np.testing.assert_array_equal(a, generate(params, CONFIG, PROMPTS, 16, seed=3, kv_cache=False, **kwargs))
    assert (a != generate(params, CONFIG, PROMPTS, 16, seed=4, **kwargs)).any()
    greedy = generate(params, CONFIG, PROMPTS, 16)
    assert (a != greedy).any()
    # top_k=1 and a tiny top_p leave only the most likely token: sampling becomes greedy.
    np.testing.assert_array_equal(generate(params, CONFIG, PROMPTS, 16, temperature=2.0, top_k=1, seed=5), greedy)
    np.testing.assert_array_equal(generate(params, CONFIG, PROMPTS, 16, temperature=2.0, top_p=1e-6, seed=5), greedy)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = jax.vmap(lambda k, s: s(logits, k)[0], in_axes=(0, None))
    assert set(np.asarray(draw(keys, Sampler(1.0, top_k=2))).tolist()) == {0, 1}
    assert set(np.asarray(draw(keys, Sampler(1.0, top_p=0.7))).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(np.asarray(draw(keys, Sampler(1.0, top_p=0.81))).tolist()) == {0, 1, 2}


def test_decoding_on_a_2x4_mesh_equals_one_device(params):
    layout = load_layout("fsdp_tp", mesh_shape={"fsdp": 2, "tensor": 4})  # 4 kv heads over tensor=4
    np.testing.assert_array_equal(
        generate(params, CONFIG, PROMPTS, 12, layout=layout), generate(params, CONFIG, PROMPTS, 12)
    )


def test_bad_requests_name_the_problem(params):
    with pytest.raises(ConfigError, match="non-empty prompts"):
        generate(params, CONFIG, [[1, 2], []], 4)
    with pytest.raises(ConfigError, match="0 < top_p <= 1"):
        generate(params, CONFIG, PROMPTS, 4, top_p=0.0)
