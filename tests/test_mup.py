"""μP initialisation statistics, Adam multipliers per parameter class (width multipliers from each matrix's fan-in
over the base shape), μP at width_mult 1 == SP, and the released configs and growth chain under that rule."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gin
from flm_jax.cli import REPO_ROOT
from flm_jax.config import TeleFLMConfig
from flm_jax.growth import GrowthSpec, grow, target_config
from flm_jax.hf.importer import resolve_mup
from flm_jax.hf.layout import TELEFLM, config_from_hf
from flm_jax.model import TeleFLM
from flm_jax.mup import PARAM_CLASSES, init_std, param_multipliers
from flm_jax.optim import OptimizerConfig, make_optimizer
from flm_jax.params import boxed_abstract_params

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
    mup_base_hidden_size=128,
    mup_base_intermediate_size=256,
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

        def loss(p):
            logits = TeleFLM(cfg).apply({"params": p}, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        @jax.jit
        def step(params, state):
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(3):
            params, state = step(params, state)
        return params, TeleFLM(cfg).apply({"params": params}, tokens)

    (p_mup, logits_mup), (p_sp, logits_sp) = trajectory(mup), trajectory(sp)
    for path, x in leaves(p_mup).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(leaves(p_sp)[path]), err_msg=path)
    np.testing.assert_array_equal(np.asarray(logits_mup), np.asarray(logits_sp))
    # ... and width_mult != 1 changes the trajectory (the test above is not vacuous).
    p_wide, _ = trajectory(mup.replace(mup_base_hidden_size=32))
    up = "layers/mlp/up_proj"
    assert not np.allclose(np.asarray(leaves(p_wide)[up]), np.asarray(leaves(p_mup)[up]))


def multipliers_by_leaf(cfg):
    """{leaf path: (init std, lr multiplier, weight-decay multiplier)} of the abstract parameter tree."""
    abstract = nn.meta.unbox(boxed_abstract_params(cfg))
    lr, wd = param_multipliers(abstract, cfg)
    return {
        path: (init_std(cfg, path.split("/")[-1]), m, leaves(wd)[path], abstract_leaf.shape)
        for (path, m), abstract_leaf in zip(leaves(lr).items(), leaves(abstract).values())
    }


def test_width_multipliers_follow_fan_in_over_the_base_not_the_logit_multiplier():
    # down_proj's fan-in is the FFN width: an FFN 8x its base against a hidden 4x its base.
    cfg = WIDE.replace(mup_base_intermediate_size=128)
    by_leaf = multipliers_by_leaf(cfg)
    for path, (std, lr, wd, _) in by_leaf.items():
        name = path.split("/")[-1]
        w = {"down_proj": 8.0}.get(name, 4.0) if PARAM_CLASSES[name].startswith("hidden") else None
        if w is None:
            continue
        depth = math.sqrt(6) if PARAM_CLASSES[name] == "hidden_residual" else 1.0
        assert (lr, wd) == (1 / w, w), path
        assert std == pytest.approx(0.02 / math.sqrt(w) / depth, rel=1e-12), path
    # The logit multiplier fields change the readout only, never a width multiplier.
    other_logits = multipliers_by_leaf(cfg.replace(mup_scale_factor=32.0, output_mult=0.25))
    assert other_logits == by_leaf
    assert cfg.replace(mup_scale_factor=32.0).logits_scale == 2.0 / 32.0


def released_hf_config(name):
    """The released config.json fields that shape and μP depend on (docs/paper.md)."""
    shape = dict(
        hidden_size=8192, intermediate_size=21824, num_hidden_layers=64, num_attention_heads=64, vocab_size=80384
    )
    fields = {
        "Tele-FLM": dict(shape, output_mult=0.5, mup_scale_factor=16.0, input_mult=1.0),
        "FLM-2-52B-Instruct": dict(
            shape,
            vocab_size=80896,
            output_mult=1.0,
            mup_scale_factor=32.0,
            input_mult=1.0,
            max_position_embeddings=2048,
        ),
    }[name]
    return {"model_type": "TeleFLM", "use_mup": True, "initializer_range": 0.02, **fields}


def test_importing_52b_base_and_52b_instruct_gives_the_same_hidden_learning_rates():
    configs = []
    for name in ("Tele-FLM", "FLM-2-52B-Instruct"):
        hf = released_hf_config(name)
        configs.append(config_from_hf(hf, resolve_mup(hf, TELEFLM, {}), {}))
    base, instruct = configs
    assert base.logits_scale == instruct.logits_scale == 1 / 32  # 0.5 / 16 = 1 / 32: the same readout
    a, b = multipliers_by_leaf(base), multipliers_by_leaf(instruct)
    for path in a:
        if path not in ("embed_tokens", "lm_head"):  # their vocabularies differ; multipliers do not
            assert a[path] == b[path], path
    assert a["layers/self_attn/q_proj"][1] == pytest.approx(256 / 8192)
    assert a["layers/mlp/down_proj"][1] == pytest.approx(682 / 21824)


def gin_config(*files, configurable=TeleFLMConfig):
    gin.clear_config()
    for f in files:
        gin.parse_config_file(str(REPO_ROOT / f))
    value = configurable()
    gin.clear_config()
    return value


def test_52b_grown_to_1t_trains_with_the_multipliers_of_a_fresh_1t():
    """gin/models/52b.gin through gin/growth/52b_to_102b.gin and 102b_to_1t.gin, abstractly (shapes only): every
    parameter gets the init scale and learning-rate / weight-decay multipliers of a fresh gin/models/1t.gin, with the
    released 1T's logit scale."""
    config = gin_config("gin/models/52b.gin")
    params = nn.meta.unbox(boxed_abstract_params(config))
    for growth in ("gin/growth/52b_to_102b.gin", "gin/growth/102b_to_1t.gin"):
        spec = gin_config(growth, configurable=GrowthSpec)
        distances = np.linspace(0.5, 0.1, config.num_hidden_layers)
        grown = jax.eval_shape(
            lambda p, s=spec, c=config, d=distances: grow(p, c, s, jax.random.key(0), distances=d).params, params
        )
        params, config = grown, target_config(config, spec)
        if growth.endswith("52b_to_102b.gin"):
            assert multipliers_by_leaf(config) == multipliers_by_leaf(gin_config("gin/models/102b.gin"))
    fresh = gin_config("gin/models/1t.gin")
    assert multipliers_by_leaf(config) == multipliers_by_leaf(fresh)
    assert leaves(params).keys() == leaves(nn.meta.unbox(boxed_abstract_params(fresh))).keys()
    assert [x.shape for x in leaves(params).values()] == [x[3] for x in multipliers_by_leaf(fresh).values()]
    assert config.logits_scale == pytest.approx(fresh.logits_scale) == pytest.approx(2.0 / 80.0)
    # down_proj follows its own fan-in: FFN x4.5 from the 52B against hidden x2.5.
    by_leaf = multipliers_by_leaf(config)
    assert by_leaf["layers/mlp/down_proj"][1] == pytest.approx(682 / 98304)
    assert by_leaf["layers/self_attn/o_proj"][1] == pytest.approx(256 / 20480)
