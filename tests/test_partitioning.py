"""Shardings per mesh layout on 8 fake CPU devices, and 1-device vs 2x4-mesh equality."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

import gin
from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.params import init_params, param_shardings
from flm_jax.partitioning import MeshLayout, batch_sharding, make_mesh
from flm_jax.training.step import lm_loss
from tests.helpers import load_layout

TINY = TeleFLMConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
    output_mult=0.5,
    mup_scale_factor=2.0,
)

# What each layout's rules prescribe, written out by hand per parameter (mesh axes per dimension).
FSDP_TP = {
    "embed_tokens": ("tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
    "norm/scale": (None,),
    "layers/input_layernorm/scale": (None, None),
    "layers/post_attention_layernorm/scale": (None, None),
    "layers/self_attn/q_proj": (None, "fsdp", "tensor", None),
    "layers/self_attn/k_proj": (None, "fsdp", "tensor", None),
    "layers/self_attn/v_proj": (None, "fsdp", "tensor", None),
    "layers/self_attn/o_proj": (None, "tensor", None, "fsdp"),
    "layers/mlp/gate_proj": (None, "fsdp", "tensor"),
    "layers/mlp/up_proj": (None, "fsdp", "tensor"),
    "layers/mlp/down_proj": (None, "tensor", "fsdp"),
}
FSDP = {name: tuple(a if a == "fsdp" else None for a in axes) for name, axes in FSDP_TP.items()}
REPLICATED = {name: (None,) * len(axes) for name, axes in FSDP_TP.items()}
EXPECTED = {"single": (REPLICATED, 1), "data_parallel": (REPLICATED, 8), "fsdp": (FSDP, 8), "fsdp_tp": (FSDP_TP, 8)}


def flat(tree):
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): x
        for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, NamedSharding))
    }


def normalise(spec, ndim, mesh):
    """Mesh axes per dimension; an axis of size 1 splits nothing (every layout shares one rules file)."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

    def split(a):
        names = [n for n in ((a,) if isinstance(a, str) else (a or ())) if sizes[n] > 1]
        return None if not names else names[0] if len(names) == 1 else tuple(names)

    axes = [split(a) for a in spec]
    return tuple(axes + [None] * (ndim - len(axes)))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameters_get_the_layouts_sharding(name):
    expected, devices = EXPECTED[name]
    layout = load_layout(name)
    mesh = make_mesh(layout, jax.devices()[:devices])
    params = init_params(TINY, mesh, layout, jax.random.key(0))  # sharded init
    assert sorted(flat(params)) == sorted(expected)
    for path, array in flat(params).items():
        assert normalise(array.sharding.spec, array.ndim, mesh) == expected[path], path
        split = [1 if a is None else mesh.shape[a] for a in expected[path]]
        # Each device holds only its slice, never the whole parameter.
        assert array.addressable_shards[0].data.shape == tuple(s // k for s, k in zip(array.shape, split)), path


def batch(seed=0, b=8, t=16):
    rng = np.random.default_rng(seed)
    segments = np.ones((b, t), np.int32)
    segments[:, t // 2 :] = 2
    segments[0, -3:] = 0
    positions = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0).astype(np.int32)
    return {
        "inputs": rng.integers(0, TINY.vocab_size, (b, t), dtype=np.int32),
        "targets": rng.integers(0, TINY.vocab_size, (b, t), dtype=np.int32),
        "segment_ids": segments,
        "positions": positions,
        "loss_weights": (segments != 0).astype(np.float32),
    }


def loss_and_grads(layout, devices, params_host, batch_host):
    mesh = make_mesh(layout, devices)
    shardings = param_shardings(TINY, mesh, layout)
    params = jax.device_put(params_host, shardings)
    data = jax.device_put(batch_host, batch_sharding(mesh, layout))

    def f(p, b):
        return jax.value_and_grad(lambda p: lm_loss(p, b, TINY)[0])(p)

    with jax.set_mesh(mesh), nn.logical_axis_rules(layout.flax_rules()):
        loss, grads = jax.jit(f, out_shardings=(None, shardings))(params, data)
    assert flat(grads)["layers/mlp/down_proj"].sharding.spec == shardings["layers"]["mlp"]["down_proj"].spec
    return float(loss), jax.tree_util.tree_map(np.asarray, grads)


def test_one_device_and_2x4_mesh_agree():
    single = load_layout("single")
    params = jax.tree_util.tree_map(
        np.asarray, init_params(TINY, make_mesh(single, jax.devices()[:1]), single, jax.random.key(1))
    )
    data = batch()
    loss_1, grads_1 = loss_and_grads(single, jax.devices()[:1], params, data)
    gin.clear_config()
    tp = load_layout("fsdp_tp")
    assert make_mesh(tp).shape == {"data": 1, "fsdp": 2, "tensor": 4}
    loss_8, grads_8 = loss_and_grads(tp, jax.devices(), params, data)
    assert np.isfinite(loss_1) and loss_1 > 1.0
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-6)
    for path, g1 in flat(grads_1).items():
        np.testing.assert_allclose(flat(grads_8)[path], g1, atol=2e-6, rtol=1e-4, err_msg=path)


def test_mesh_that_does_not_divide_a_dimension_is_refused():
    layout = load_layout("fsdp_tp")
    bad = TINY.replace(hidden_size=48, num_attention_heads=6, num_key_value_heads=6)  # 6 heads on tensor=4
    with pytest.raises(
        ConfigError,
        match=r"k_proj dimension 2 \(logical axis 'kv_heads', size 6\).*"
        r"TeleFLMConfig.num_key_value_heads a multiple of 4",
    ):
        param_shardings(bad, make_mesh(layout), layout)


def test_unknown_mesh_axis_is_refused():
    with pytest.raises(ConfigError, match=r"'heads' -> 'model' names an unknown mesh axis.*MeshLayout.rules"):
        MeshLayout(name="bad", rules=(("heads", "model"),))
    with pytest.raises(ConfigError, match=r"unknown mesh axis \['model'\] in mesh_shape"):
        MeshLayout(name="bad", mesh_shape={"model": 2})


def test_mesh_that_does_not_fit_the_devices_is_refused():
    with pytest.raises(ConfigError, match="needs 16 devices but 8 are available"):
        make_mesh(MeshLayout(name="bad", mesh_shape={"fsdp": 4, "tensor": 4}))
    with pytest.raises(ConfigError, match="needs 6 devices but 8 are available"):
        make_mesh(MeshLayout(name="bad", mesh_shape={"fsdp": 2, "tensor": 3}), jax.devices())
    with pytest.raises(ConfigError, match="8 devices cannot be split into a mesh"):
        make_mesh(MeshLayout(name="bad", mesh_shape={"fsdp": -1, "tensor": 3}))
    # A fully specified mesh smaller than the host takes the first devices it needs.
    assert make_mesh(MeshLayout(name="small", mesh_shape={"fsdp": 2, "tensor": 3})).devices.size == 6
