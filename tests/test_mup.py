"""μP initialisation statistics, Adam multipliers per parameter class, and μP at width_mult 1 == SP."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flm_jax.config import TeleFLMConfig
from flm_jax.model import TeleFLM
from flm_jax.mup import param_multipliers
from flm_jax.optim import OptimizerConfig, make_optimizer

WIDE = TeleFLMConfig(
    vocab_size=512,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=3,
    num_attention_heads=8,
    use_mup=True,
    mup_scale_factor=4.0,
    output_mult=2.0,
    initializer_range=0.02,
)
CLASSES = {  # leaf -> (init std, lr multiplier, weight-decay multiplier) for width_mult 4, L = 3, σ = 0.02
    "embed_tokens": (0.02, 1.0, 1.0),
    "lm_head": (0.02, 1.0, 1.0),
    "q_proj": (0.01, 0.25, 4.0),
    "k_proj": (0.01, 0.25, 4.0),
    "v_proj": (0.01, 0.25, 4.0),
    "gate_proj": (0.01, 0.25, 4.0),
    "up_proj": (0.01, 0.25, 4.0),
    "o_proj": (0.01 / math.sqrt(6), 0.25, 4.0),
    "down_proj": (0.01 / math.sqrt(6), 0.25, 4.0),
    "scale": (0.0, 1.0, 0.0),
}


def init(cfg, seed=0):
    return nn.meta.unbox(TeleFLM(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def leaves(tree):
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in flat}


def test_init_statistics_per_parameter_class():
    for path, x in leaves(init(WIDE)).items():
        std, _, _ = CLASSES[path.split("/")[-1]]
        x = np.asarray(x)
        if std == 0.0:
            np.testing.assert_array_equal(x, 1.0)  # norm gains start at one
        else:
            assert abs(x.mean()) < 3 * std / math.sqrt(x.size), path
            assert x.std() == pytest.approx(std, rel=0.03), path


def test_adam_multipliers_per_parameter_class():
    params = init(WIDE)
    lr_mult, wd_mult = param_multipliers(params, WIDE)
    for path, m in leaves(lr_mult).items():
        _, lr, wd = CLASSES[path.split("/")[-1]]
        assert m == lr and leaves(wd_mult)[path] == wd, path
    # Through the optimizer: the first Adam step moves each entry by lr·m_lr·(1 + wd·m_wd·p) (|m/sqrt(v)| = 1).
    peak, wd = 1e-2, 0.1
    optimizer = OptimizerConfig(
        peak_learning_rate=peak, warmup_steps=0, schedule="constant", weight_decay=wd, grad_clip_norm=None
    )
    tx, _ = make_optimizer(params, WIDE, optimizer, 10)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, u in leaves(updates).items():
        _, lr, wdm = CLASSES[path.split("/")[-1]]
        p = np.asarray(leaves(params)[path])
        np.testing.assert_allclose(np.asarray(u), -peak * lr * (1 + wd * wdm * p), rtol=1e-4, atol=1e-9, err_msg=path)


def test_mup_at_width_mult_one_is_standard_parametrisation():
    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    mup = TeleFLMConfig(**shape, use_mup=True, mup_scale_factor=1.0, input_mult=1.0, output_mult=1.0)
    sp = TeleFLMConfig(**shape, use_mup=False, mup_scale_factor=16.0, input_mult=3.0, output_mult=0.5)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16)), jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)

    def trajectory(cfg):
        params = init(cfg, seed=3)
        tx, _ = make_optimizer(params, cfg, OptimizerConfig(peak_learning_rate=1e-2, warmup_steps=1), 5)
        state = tx.init(params)
        for _ in range(3):

            def loss(p):
                logits = TeleFLM(cfg).apply({"params": p}, tokens)
                return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

            grads = jax.grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params, TeleFLM(cfg).apply({"params": params}, tokens)

    (p_mup, logits_mup), (p_sp, logits_sp) = trajectory(mup), trajectory(sp)
    for path, x in leaves(p_mup).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(leaves(p_sp)[path]), err_msg=path)
    np.testing.assert_array_equal(np.asarray(logits_mup), np.asarray(logits_sp))
    # ... and width_mult != 1 changes the trajectory (the test above is not vacuous).
    p_wide, _ = trajectory(mup.replace(mup_scale_factor=2.0))
    up = "layers/mlp/up_proj"
    assert not np.allclose(np.asarray(leaves(p_wide)[up]), np.asarray(leaves(p_mup)[up]))
