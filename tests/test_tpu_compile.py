"""The train step compiled ahead of time for TPU slices on this CPU host (flm_jax.aot, `flm_jax.plan --compile`).

These need XLA's TPU compiler, libtpu (requirements-tpu-compile.txt; CI installs it); without it they are skipped.
"""

import importlib.util
import json

import jax
import pytest

from flm_jax import aot
from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.optim import OptimizerConfig
from flm_jax.partitioning import MeshLayout
from flm_jax.planning import make_plan
from flm_jax.topology import parse_slice
from tests.helpers import load_layout, run_module

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed: pip install -r requirements-tpu-compile.txt to compile for TPU on this host",
)

TINY = TeleFLMConfig(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=512,
    dtype="bfloat16",
    remat_policy="full",
)


def fsdp_tensor(fsdp: int, tensor: int) -> MeshLayout:
    return load_layout("fsdp_tp", mesh_shape={"data": 1, "fsdp": fsdp, "tensor": tensor})


def test_tiny_step_compiles_for_v5p_with_the_layouts_shardings():
    tpu = parse_slice("v5p:2x2x1")
    layout = fsdp_tensor(2, 2)
    step = aot.compile_train_step(TINY, layout, OptimizerConfig(), tpu, batch_size=8, seq_len=256)
    report = step.report
    assert step.mesh.devices.size == 4 and step.mesh.devices.flat[0].platform == "tpu"
    # Parameters and Adam moments in, the same out, all donated.
    plan = make_plan(TINY, layout, 4, 8, 256)
    state_gib = (plan["bytes_per_device"]["params"] + plan["bytes_per_device"]["optimizer"]) / 2**30
    assert report["argument_gib"] == pytest.approx(state_gib, rel=0.02)
    assert report["alias_gib"] == pytest.approx(report["output_gib"], rel=0.01)
    assert 0 < report["temp_gib_per_device"] < report["total_gib_per_device"] < 1.0
    # The compiled step takes its state sharded exactly as the layout says: embed over fsdp, heads over tensor.
    state_in = step.compiled.input_shardings[0][0]
    specs = jax.tree_util.tree_map(lambda s: s.spec, state_in["params"])
    expected = jax.tree_util.tree_map(lambda s: s.spec, step.spec.shardings["params"])
    assert specs == expected
    assert tuple(specs["layers"]["self_attn"]["q_proj"]) == (None, "fsdp", "tensor", None)
    assert tuple(specs["layers"]["mlp"]["down_proj"]) == (None, "tensor", "fsdp")
    # Full remat recomputes the forward pass: executed FLOPs are ~8/6 of the model's 6N + attention.
    assert report["loop_scale"] > 1
    assert 0.7 < report["mfu_at_peak"] < 0.8, report["mfu_at_peak"]


def test_splash_attention_compiles_as_a_tpu_kernel_in_the_step():
    """The Pallas splash kernels (forward, dq, dkv) are TPU custom calls in the compiled program, under the mesh's
    shard_map; save_attn keeps their residuals, so the forward kernel is not re-run in the backward pass."""
    cfg = TINY.replace(hidden_size=512, attention_impl="splash", remat_policy="save_attn")  # head_dim 128
    step = aot.compile_train_step(cfg, fsdp_tensor(2, 2), OptimizerConfig(), parse_slice("v5p-8"), 8, 256)
    # One forward and two gradient kernels, each once: the layer scan's body is one layer (under full remat the
    # forward kernel runs a second time, 4 calls).
    assert step.compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3
    assert {"splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"} <= {
        name.split("_segmented")[0] for name in step.report["uncounted_kernels"]
    }


def test_loop_scale_counts_scan_bodies_per_iteration():
    """The traced matmul count with scan trip counts: 4 layers cost 4x one layer's dots inside the scan."""

    def f(x, w):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=4)[0].sum()

    x, w = jax.ShapeDtypeStruct((8, 16), "float32"), jax.ShapeDtypeStruct((16, 16), "float32")
    jaxpr = jax.make_jaxpr(f)(x, w).jaxpr
    assert aot.matmul_flops(jaxpr) == 4 * 2 * 8 * 16 * 16
    assert aot.matmul_flops(jaxpr, count_loops=False) == 2 * 8 * 16 * 16
    assert aot.loop_scale(jaxpr) == 4


def test_plan_compile_estimate_within_15_percent_on_8_chips():
    """A mid-size model on a v5p-16 slice (8 chips, fsdp 4 x tensor 2) through the command line."""
    out = run_module(
        "flm_jax.plan",
        "--gin_file=gin/models/base.gin",
        "--gin_file=gin/meshes/fsdp_tp.gin",
        *(
            f"--gin.TeleFLMConfig.{k}={v}"
            for k, v in dict(
                vocab_size=32768,
                hidden_size=1024,
                intermediate_size=2816,
                num_hidden_layers=8,
                num_attention_heads=8,
                max_position_embeddings=1024,
            ).items()
        ),
        "--gin.MeshLayout.mesh_shape={'fsdp': 4, 'tensor': 2}",
        "--compile",
        "--topology=v5p-16",
        "--batch_size=32",
        "--num_microbatches=2",
        "--json",
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout)
    compiled = plan["compiled"]
    assert compiled["num_chips"] == 8 and plan["num_devices"] == 8 and compiled["fits"]
    assert compiled["compile_seconds"] > 0 and compiled["temp_gib_per_device"] > 0
    assert abs(plan["estimate_error"]) < 0.15, (plan["total_gib_per_device"], compiled["total_gib_per_device"])


def test_a_mesh_that_does_not_fit_the_slice_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"is for 8 chips but v5p-8 has 4"):
        aot.slice_mesh(load_layout("fsdp_tp", num_devices=8), parse_slice("v5p-8"))
    # 8x8x8 torus: a mesh axis of 4 is no product of whole torus axes.
    layout = load_layout("fsdp_tp", mesh_shape={"data": 1, "fsdp": 128, "tensor": 4})
    with pytest.raises(ConfigError, match=r"does not map onto the v5p:8x8x8 torus"):
        aot.slice_mesh(layout, parse_slice("v5p-1024"))


def test_a_step_larger_than_the_chip_is_a_clear_error():
    """16.8M tokens per chip: their logits alone need more than a v5p's 95 GiB."""
    with pytest.raises(ConfigError, match=r"does not fit a v5p chip: RESOURCE_EXHAUSTED.*more microbatches"):
        aot.compile_train_step(TINY, fsdp_tensor(2, 2), OptimizerConfig(), parse_slice("v5p-8"), 65536, 512)
