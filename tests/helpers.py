"""Shared test helpers: the small models, mesh layouts and optimizer the tests train with, and tree comparisons.
Test modules import from here, never from each other."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import gin
from flm_jax.cli import REPO_ROOT, resolve_gin_file
from flm_jax.config import TeleFLMConfig
from flm_jax.optim import OptimizerConfig
from flm_jax.partitioning import MeshLayout, make_mesh
from flm_jax.training.checkpoint import Checkpointer
from flm_jax.training.config import TrainConfig
from flm_jax.training.loop import train
from flm_jax.training.state import StateSpec

MODEL = TeleFLMConfig(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    output_mult=0.5,
    mup_scale_factor=2.0,
    remat_policy="none",
)
# A learning rate that moves a 6-step run (the defaults warm up over 100 steps); CLI runs get the same flags.
FAST_OPTIMIZER = OptimizerConfig(peak_learning_rate=1e-2, warmup_steps=2)
FAST_FLAGS = ["--gin.OptimizerConfig.peak_learning_rate=0.01", "--gin.OptimizerConfig.warmup_steps=2"]
# The model's shape and multipliers as command-line bindings.
MODEL_FLAGS = [
    f"--gin.TeleFLMConfig.{k}={v!r}"
    for k, v in MODEL.to_dict().items()
    if k
    in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "output_mult",
        "mup_scale_factor",
        "remat_policy",
    )
]


def load_layout(name: str, **overrides) -> MeshLayout:
    """The shipped mesh layout gin/meshes/<name>.gin, with MeshLayout fields overridden."""
    with gin.unlock_config():
        gin.clear_config()
        gin.parse_config_file(resolve_gin_file(f"gin/meshes/{name}.gin"))
        layout = MeshLayout()
        gin.clear_config()
    return MeshLayout(**{**layout.__dict__, **overrides})


# The MSG ramp of a growth of MODEL's shape at step 0 over 10 steps (as checkpoint metadata records it): a
# checkpoint at step 2 is mid-ramp, mask 0.2, neither the source model nor the grown one.
RAMP = {
    "start_step": 0,
    "ramp_steps": 10,
    "old_hidden": 64,
    "old_heads": 4,
    "old_ffn": 128,
    "new_layers": [False, False],
}

SINGLE = load_layout("single")
FSDP_TP = load_layout("fsdp_tp", mesh_shape={"fsdp": 2, "tensor": 4})  # the 2x4 mesh on 8 devices
FSDP8 = load_layout("fsdp", mesh_shape={"fsdp": 8})


def run_train(
    workdir,
    train_cfg: TrainConfig,
    model: TeleFLMConfig = MODEL,
    layout: MeshLayout = SINGLE,
    optimizer: OptimizerConfig = FAST_OPTIMIZER,
    **kwargs,
):
    return train(workdir, model_cfg=model, layout=layout, optimizer_cfg=optimizer, train_cfg=train_cfg, **kwargs)


def restore(workdir, layout: MeshLayout = SINGLE, model: TeleFLMConfig = MODEL, step=None, devices=None):
    """(state, data state, metadata) of a workdir's checkpoint, restored onto `layout` over `devices`."""
    mesh = make_mesh(layout, devices or jax.devices()[:1])
    ckpt = Checkpointer(workdir)
    step = ckpt.latest_step() if step is None else step
    state, data_state, meta = ckpt.restore(step, StateSpec.build(model, FAST_OPTIMIZER, mesh, layout, 1).abstract)
    ckpt.close()
    return state, data_state, meta


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in Path(workdir, "metrics.jsonl").read_text().splitlines()]


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def randomise(params, seed):
    """Random values for every leaf, norm gains around 1, so that no term of the math can hide."""

    def draw(path, x):
        key = jax.random.fold_in(jax.random.key(seed), hash(jax.tree_util.keystr(path)) % 2**31)
        noise = jax.random.normal(key, x.shape)
        return 1.0 + 0.2 * noise if path[-1].key == "scale" else 0.08 * noise

    return jax.jit(lambda p: jax.tree_util.tree_map_with_path(draw, p))(params)  # one compile, not one per shape


def packed_positions(segments: np.ndarray) -> np.ndarray:
    """Positions that restart at every segment of packed rows [b, t]."""
    pos = np.zeros_like(segments)
    for b, row in enumerate(segments):
        for t in range(1, len(row)):
            pos[b, t] = pos[b, t - 1] + 1 if row[t] == row[t - 1] else 0
    return pos


def xla_flags(device_count: int) -> str:
    """The suite's XLA flags (tests/conftest.py) with `device_count` fake CPU devices, for a subprocess whose
    results are compared bitwise with this process's: both must compile at the same optimisation level."""
    return re.sub(r"(--xla_force_host_platform_device_count=)\d+", rf"\g<1>{device_count}", os.environ["XLA_FLAGS"])


def run_module(
    module: str, *args, env: dict | None = None, timeout: int = 300, cwd=REPO_ROOT
) -> subprocess.CompletedProcess:
    """`python -m module args...` from `cwd` (the test process's XLA flags unless env says)."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
