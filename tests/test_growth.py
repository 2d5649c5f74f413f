"""Growth operators: function preservation (float64 and float32), old gradients, training dynamics after
duplication, property-based shapes, sharded growth across meshes, and the grow entry point's refusals."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.growth import GrowthSpec, counter_rng, grow, target_config
from flm_jax.growth.checkpoint import grow_checkpoint
from flm_jax.growth.operators import axis_roles, grow_tree
from flm_jax.model import TeleFLM
from flm_jax.optim import OptimizerConfig, make_optimizer
from flm_jax.params import param_shardings
from flm_jax.partitioning import MeshLayout, make_mesh
from flm_jax.training.checkpoint import Checkpointer
from flm_jax.training.config import TrainConfig
from tests.helpers import SINGLE, metrics, run_module, run_train

SRC = TeleFLMConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    use_mup=True,
    mup_scale_factor=2.0,
    input_mult=1.3,
    output_mult=0.7,
    remat_policy="none",
)
F64 = dict(dtype="float64", param_dtype="float64")
SPECS = {
    "hidden_heads_new": GrowthSpec(hidden_size=48, num_attention_heads=6, mode="exact"),
    "hidden_heads_ffn_duplicate": GrowthSpec(
        hidden_size=64,
        num_attention_heads=8,
        intermediate_size=96,
        mode="exact",
        hidden_method="duplicate",
        heads_method="duplicate",
        ffn_method="duplicate",
        duplicate_noise=0.01,
    ),
    "hidden_copies_plus_padding": GrowthSpec(
        hidden_size=80, num_attention_heads=10, mode="exact", hidden_method="duplicate", duplicate_noise=0.01
    ),
    "ffn_new": GrowthSpec(intermediate_size=80, mode="exact"),
    "depth_even": GrowthSpec(num_hidden_layers=5, mode="exact", layer_strategy="even"),
    "depth_stack": GrowthSpec(num_hidden_layers=6, mode="exact", layer_strategy="stack"),
    "depth_interleave": GrowthSpec(num_hidden_layers=4, mode="exact", layer_strategy="interleave"),
    "depth_distance": GrowthSpec(num_hidden_layers=5, mode="exact", layer_strategy="distance"),
    "vocab": GrowthSpec(vocab_size=80, mode="exact"),
    "msg_everything": GrowthSpec(
        hidden_size=48, num_attention_heads=6, intermediate_size=72, num_hidden_layers=5, mode="msg"
    ),
    "msg_with_vocab": GrowthSpec(hidden_size=48, num_attention_heads=6, vocab_size=80, mode="msg"),
    # MSG's own ramp form: whole new blocks blended, new heads masked on Q/K/V, new FFN units before the activation.
    "msg_block_everything": GrowthSpec(
        hidden_size=48, num_attention_heads=6, intermediate_size=72, num_hidden_layers=5, mode="msg", msg_form="block"
    ),
    "msg_keep_readout": GrowthSpec(hidden_size=64, num_attention_heads=8, mode="msg", readout="keep"),
}
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)


def random_params(cfg, seed=0):
    """Trained-looking parameters: every leaf random (norm gains around 1), so no operator can rely on init."""

    def draw(path, x):
        noise = jax.random.normal(
            jax.random.fold_in(jax.random.key(seed + 1), len(jax.tree_util.keystr(path))), x.shape, x.dtype
        )
        return 1.0 + 0.2 * noise if path[-1].key == "scale" else 0.1 * noise

    @jax.jit  # one compile per shape, not one per operation
    def make():
        params = nn.meta.unbox(TeleFLM(cfg).init(jax.random.key(seed), TOKENS)["params"])
        return jax.tree_util.tree_map_with_path(draw, params)

    return make()


@functools.partial(jax.jit, static_argnums=0)  # one compile per shape: run eagerly, the model is op by op
def logits(cfg, params, masks=None):
    return TeleFLM(cfg).apply({"params": params}, TOKENS, masks=masks)


def grown_logits(src, params, spec, m=0.0):
    distances = np.linspace(0.3, 0.1, src.num_hidden_layers) if spec.layer_strategy == "distance" else None
    result = grow(params, src, spec, jax.random.key(7), distances=distances)
    masks = result.ramp.masks(result.config, m) if result.ramp else None
    return logits(result.config, result.params, masks), result


@pytest.mark.parametrize("name", sorted(SPECS))
def test_exact_operators_and_msg_at_zero_preserve_logits_in_float64(name):
    with jax.enable_x64(True):
        src = SRC.replace(**F64)
        params = random_params(src)
        before = logits(src, params)
        after, result = grown_logits(src, params, SPECS[name])
        assert after.dtype == jnp.float64 and result.config.params_total() > src.params_total()
        assert float(jnp.abs(after[..., : src.vocab_size] - before).max()) <= 1e-9
        if result.ramp:  # the mask ramp really moves the function, and m = 1 is the plain grown model
            at_one, _ = grown_logits(src, params, SPECS[name], m=1.0)
            plain = logits(result.config, result.params)
            assert float(jnp.abs(at_one[..., :64] - before).max()) > 1e-3
            np.testing.assert_allclose(np.asarray(at_one), np.asarray(plain), atol=1e-12)  # rounding only


def test_the_two_msg_ramp_forms_agree_at_the_ends_of_the_ramp_and_differ_inside_it():
    with jax.enable_x64(True):
        src = SRC.replace(**F64)
        params = random_params(src)
        sublayer, block = SPECS["msg_everything"], SPECS["msg_block_everything"]
        for m, differ in ((0.0, False), (0.5, True), (1.0, False)):
            a, _ = grown_logits(src, params, sublayer, m)
            b, _ = grown_logits(src, params, block, m)
            gap = float(jnp.abs(a - b).max())
            assert gap > 1e-3 if differ else gap <= 1e-9, (m, gap)


@pytest.mark.parametrize("name", ["hidden_heads_new", "hidden_heads_ffn_duplicate", "msg_everything"])
def test_float32_relative_difference(name):
    params = random_params(SRC)
    before = np.asarray(logits(SRC, params))
    after, _ = grown_logits(SRC, params, SPECS[name])
    relative = np.abs(np.asarray(after)[..., :64] - before).max() / np.abs(before).max()
    assert relative <= 1e-5


def old_part(tree, src, tgt, order):
    """The entries of a grown tree that correspond to the source tree (leading ranges, old layers)."""
    old_layers = np.asarray([i for i, (_, new) in enumerate(order) if not new])
    sizes = {
        "hidden": (src.hidden_size,),
        "heads": (src.num_attention_heads,),
        "ffn": (src.intermediate_size,),
        "kv_heads": (src.num_key_value_heads,),
        "vocab": (src.vocab_size,),
    }

    def cut(path, x):
        for axis, role in enumerate(axis_roles(path)):
            if role is None:
                continue
            if role[0] == "layers":
                x = jnp.take(x, old_layers, axis=axis)
            else:
                x = jax.lax.slice_in_dim(x, 0, sizes[role[0]][0], axis=axis)
        return x

    return jax.tree_util.tree_map_with_path(cut, tree)


@pytest.mark.parametrize(
    "name", ["hidden_heads_new", "ffn_new", "depth_even", "msg_everything", "msg_block_everything", "msg_keep_readout"]
)
def test_gradients_of_old_entries_are_unchanged(name):
    """Zero padding, zeroed outputs, identity layers and masks at 0 leave every old parameter's gradient as it
    was (docs/growth_math.md); the μP readout rescale divides the head's gradient by the width ratio. (Vocabulary growth
    keeps every old logit but not the softmax: new tokens get logit 0, so its gradients change.)"""
    with jax.enable_x64(True):
        src = SRC.replace(**F64)
        params = random_params(src)
        targets = np.roll(TOKENS, -1, axis=1) % src.vocab_size

        def loss(cfg, masks=None):
            def f(p):
                logits = TeleFLM(cfg).apply({"params": p}, TOKENS, masks=masks)
                return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

            return f

        before = jax.jit(jax.grad(loss(src)))(params)
        result = grow(params, src, SPECS[name], jax.random.key(7))
        masks = result.ramp.masks(result.config, 0.0) if result.ramp else None
        after = old_part(jax.jit(jax.grad(loss(result.config, masks)))(result.params), src, result.config, result.order)
        ratio = result.config.mup_scale_factor / src.mup_scale_factor
        for (path, g_old), g_new in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree_util.tree_leaves(after)):
            expected = g_old / ratio if path[-1].key == "lm_head" else g_old
            np.testing.assert_allclose(g_new, expected, atol=1e-12, rtol=1e-9, err_msg=jax.tree_util.keystr(path))


def test_duplication_with_transformed_moments_follows_the_small_model():
    """x2 duplication of hidden, heads and FFN, Adam moments transformed (mu/k, nu/k^2 on written axes) and μP
    learning rates (lr / width_mult): 10 more steps of the grown model compute the small model's logits."""
    src = SRC.replace(num_key_value_heads=4, mup_scale_factor=1.0)
    spec = GrowthSpec(
        hidden_size=64,
        num_attention_heads=8,
        intermediate_size=96,
        mode="exact",
        hidden_method="duplicate",
        heads_method="duplicate",
        ffn_method="duplicate",
    )
    opt = OptimizerConfig(
        peak_learning_rate=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.1, grad_clip_norm=None, eps=1e-12
    )
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 64, (4, 12)).astype(np.int32) for _ in range(13)]

    def train(cfg, params, opt_state, tx, steps):
        def loss(p, tokens):
            logits = TeleFLM(cfg).apply({"params": p}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        @jax.jit
        def step(p, s, tokens):
            updates, s = tx.update(jax.grad(loss)(p, tokens), s, p)
            return optax.apply_updates(p, updates), s

        for tokens in steps:
            params, opt_state = step(params, opt_state, tokens)
        return params, opt_state

    params = random_params(src)
    tx, _ = make_optimizer(params, src, opt, 20)
    params, opt_state = train(src, params, tx.init(params), tx, batches[:3])  # some history in the moments
    grown = grow(params, src, spec, jax.random.key(0), opt_state=opt_state)
    tx_big, _ = make_optimizer(grown.params, grown.config, opt, 20)
    small, _ = train(src, params, opt_state, tx, batches[3:])
    big, _ = train(grown.config, grown.params, grown.opt_state, tx_big, batches[3:])
    probe = batches[0][:, :-1]
    small_logits = np.asarray(TeleFLM(src).apply({"params": small}, probe))
    big_logits = np.asarray(TeleFLM(grown.config).apply({"params": big}, probe))
    moved = np.abs(small_logits - np.asarray(TeleFLM(src).apply({"params": params}, probe))).max()
    assert moved > 0.05  # the 10 steps changed the model ...
    np.testing.assert_allclose(big_logits, small_logits, atol=2e-5 * np.abs(small_logits).max())  # ... identically


@settings(max_examples=6, deadline=None)
@given(
    heads=st.integers(1, 3),
    kv_div=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([4, 8]),
    layers=st.integers(1, 3),
    ffn=st.integers(4, 24),
    extra_heads=st.integers(0, 3),
    extra_ffn=st.integers(0, 16),
    extra_layers=st.integers(0, 3),
    mode=st.sampled_from(["exact", "msg"]),
    seed=st.integers(0, 1000),
)
def test_property_random_shapes_preserve_the_function(
    heads, kv_div, head_dim, layers, ffn, extra_heads, extra_ffn, extra_layers, mode, seed
):
    kv = heads if heads % kv_div else heads // kv_div
    group = heads // kv
    src = SRC.replace(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        **F64,
    )
    new_heads = heads + group * extra_heads
    spec = GrowthSpec(
        hidden_size=new_heads * head_dim,
        num_attention_heads=new_heads,
        intermediate_size=ffn + extra_ffn,
        num_hidden_layers=layers + extra_layers,
        mode=mode,
        seed=seed,
    )
    with jax.enable_x64(True):
        params = random_params(src, seed)
        before = logits(src, params)
        after, _ = grown_logits(src, params, spec)
        assert float(jnp.abs(after - before).max()) <= 1e-9


def test_sharded_growth_across_meshes_equals_one_device():
    src = SRC.replace(num_key_value_heads=4)
    spec = GrowthSpec(hidden_size=64, num_attention_heads=8, intermediate_size=96, num_hidden_layers=4, mode="msg")
    tgt = target_config(src, spec)
    params = random_params(src)
    rules = (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"))
    mesh_2x4 = MeshLayout(name="2x4", mesh_shape={"fsdp": 2, "tensor": 4}, rules=rules)
    mesh_4x2 = MeshLayout(name="4x2", mesh_shape={"fsdp": 4, "tensor": 2}, rules=rules)
    order = grow(params, src, spec, jax.random.key(3)).order

    def grown_on(src_layout, tgt_layout, devices):
        src_mesh, tgt_mesh = make_mesh(src_layout, devices), make_mesh(tgt_layout, devices)
        sharded = jax.device_put(params, param_shardings(src, src_mesh, src_layout))
        out = jax.jit(
            lambda p: grow_tree(p, src, tgt, spec, order, "params", jax.random.key(3)),
            out_shardings=param_shardings(tgt, tgt_mesh, tgt_layout),
        )(sharded)
        return out

    single = MeshLayout(name="single")
    on_one = grown_on(single, single, jax.devices()[:1])
    on_mesh = grown_on(mesh_2x4, mesh_4x2, jax.devices())
    q = on_mesh["layers"]["self_attn"]["q_proj"]
    assert q.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2} and len(q.addressable_shards) == 8
    for a, b in zip(jax.tree_util.tree_leaves(on_one), jax.tree_util.tree_leaves(on_mesh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_counter_generator_draws_independent_standard_normals():
    """New entries' random values (flm_jax.growth.counter_rng): standard normal, uncorrelated with their
    neighbours and with other streams, a pure function of seed and coordinates."""
    seed = counter_rng.seed_from_key(jax.random.key(3))
    draw = jax.jit(counter_rng.normal, static_argnums=1)
    z = np.asarray(draw(seed, (512, 384)), np.float64)
    n = z.size
    assert abs(z.mean()) < 4 / np.sqrt(n) and abs(z.std() - 1) < 0.01
    for tail, probability in ((1, 0.3173), (2, 0.0455), (3, 0.0027)):  # two-sided normal tails
        assert abs((np.abs(z) > tail).mean() - probability) < 6 * np.sqrt(probability / n)
    others = [draw(counter_rng.fold_in(seed, i), (512, 384)) for i in (1, 2)]
    others.append(draw(counter_rng.seed_from_key(jax.random.key(4)), (512, 384)))
    for a, b in [(z[1:], z[:-1]), (z[:, 1:], z[:, :-1]), *((z, np.asarray(o)) for o in others)]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    np.testing.assert_array_equal(np.asarray(draw(seed, (7, 5))), z[:7, :5])
    # the extreme hashes give finite, opposite values (a 24-bit uniform once rounded to 1.0: an infinite weight)
    lowest, highest = np.asarray(counter_rng.to_normal(jnp.asarray([0, 2**32 - 1], jnp.uint32)))
    assert np.isfinite([lowest, highest]).all() and lowest == -highest and 5 < highest < 6


def test_bad_growths_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"hidden_size=16 is smaller than the source's 32.*never shrinks"):
        target_config(SRC, GrowthSpec(hidden_size=16, num_attention_heads=2))
    with pytest.raises(ConfigError, match=r"changes head_dim from 8 to 12.*num_attention_heads = hidden_size / 8"):
        target_config(SRC, GrowthSpec(hidden_size=48, num_attention_heads=4))
    with pytest.raises(ConfigError, match=r"breaks the kv groups of 2"):
        target_config(SRC, GrowthSpec(hidden_size=40, num_attention_heads=5))
    with pytest.raises(ConfigError, match=r"has hidden_size=32 but this growth expects 256"):
        target_config(SRC, GrowthSpec(hidden_size=320, num_attention_heads=40, expect_source={"hidden_size": 256}))
    with pytest.raises(ConfigError, match=r"MSG mode grows with new, masked units"):
        GrowthSpec(hidden_size=64, hidden_method="duplicate", mode="msg")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("source")
    run_train(workdir, TrainConfig(steps=2, batch_size=8, seq_len=32, eval_tasks=()))
    return workdir


GROW_GIN = """
GrowthSpec.hidden_size = 96
GrowthSpec.num_attention_heads = 6
GrowthSpec.intermediate_size = 192
GrowthSpec.num_hidden_layers = 3
GrowthSpec.mode = "msg"
GrowthSpec.ramp_steps = 2
MeshLayout.mesh_shape = {"data": 1}
"""


def test_grow_entry_point_writes_a_run_that_train_continues_through_the_ramp(trained, tmp_path):
    (tmp_path / "grow.gin").write_text(GROW_GIN)
    dst = tmp_path / "grown"
    out = run_module(
        "flm_jax.grow", f"--gin_file={tmp_path / 'grow.gin'}", f"--from_workdir={trained}", f"--workdir={dst}"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((dst / "growth.json").read_text())
    assert report["step"] == 2 and report["max_abs_dlogit"] < 1e-4 and abs(report["dloss"]) < 1e-5
    assert "max |Δlogit|" in out.stdout and report["target_params"] > report["source_params"]
    # The source was trained in-process with explicit configs, so its config.gin holds no TrainConfig: pass it.
    run_flags = [
        "--gin.TrainConfig.steps=5",
        "--gin.TrainConfig.batch_size=8",
        "--gin.TrainConfig.seq_len=32",
        "--gin.TrainConfig.eval_tasks=()",
        "--gin.TrainConfig.log_every=1",
    ]
    out = run_module("flm_jax.train", f"--workdir={dst}", *run_flags)
    assert out.returncode == 0, out.stderr[-3000:]
    records = metrics(dst)
    assert [r["step"] for r in records] == [3, 4, 5]
    assert [r.get("growth_mask") for r in records] == [0.0, 0.5, None]  # ramp 0 -> 1, then folded away
    ckpt = Checkpointer(dst)
    assert ckpt.latest_step() == 5 and "growth" not in ckpt.metadata(5)  # a plain model again
    assert ckpt.metadata(5)["model_config"]["hidden_size"] == 96


def test_grow_refusals_write_nothing(trained, tmp_path):
    spec = GrowthSpec(hidden_size=96, num_attention_heads=6, mode="msg")
    with pytest.raises(ConfigError, match="smaller than the source's"):
        grow_checkpoint(trained, tmp_path / "a", GrowthSpec(intermediate_size=8), SINGLE)
    with pytest.raises(ConfigError, match="changes head_dim"):
        grow_checkpoint(trained, tmp_path / "a", GrowthSpec(hidden_size=96, num_attention_heads=4), SINGLE)
    with pytest.raises(ConfigError, match=r"max \|Δlogit\| .* > GrowthSpec.tolerance=1e-12. Nothing was written"):
        grow_checkpoint(
            trained,
            tmp_path / "a",
            GrowthSpec(hidden_size=96, num_attention_heads=6, tolerance=1e-12, duplicate_noise=0.0),
            SINGLE,
        )
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty; grow never writes over a run"):
        grow_checkpoint(trained, tmp_path / "b", spec, SINGLE)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["notes.txt"]


def test_the_schedule_plot_draws_every_stage_and_marks_each_growth(tmp_path):
    from flm_jax.growth.schedule import plot_schedule

    growth = {"step": 3, "source_params": 1_000_000, "target_params": 2_000_000}
    rows = [
        {"stage": 1, "curve": [(1, 7.0, 7.1, 1e9), (2, 6.0, None, 2e9), (3, 5.5, 5.6, 3e9)]},
        {"stage": 2, "growth": growth, "curve": [(4, 5.4, None, 5e9), (5, 5.2, 5.3, 7e9)]},
    ]
    plot_schedule(rows, tmp_path / "schedule.png")
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "schedule.png")
    assert image.shape[0] > 300 and image.shape[1] > 600 and image[..., :3].std() > 0.05  # a drawn picture
