"""Training end to end: exact resume, restore across meshes, crash recovery, every experiment gin file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

from flm_jax.checkpoint import Checkpointer
from flm_jax.cli import REPO_ROOT
from flm_jax.config import TeleFLMConfig
from flm_jax.partitioning import MeshLayout, make_mesh
from flm_jax.train import StateSpec, TrainConfig, train

MODEL = TeleFLMConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, output_mult=0.5, mup_scale_factor=2.0,
                      remat_policy="none")
RUN = TrainConfig(steps=6, batch_size=8, seq_len=32, log_every=1, eval_tasks=(), checkpoint_every=2)
SINGLE = MeshLayout(name="single", mesh_shape={"data": 1})
FSDP_TP = MeshLayout(name="fsdp_tp", mesh_shape={"fsdp": 2, "tensor": 4},
                     rules=(("act_batch", "fsdp"), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
                            ("kv_heads", "tensor"), ("vocab", "tensor")))
FSDP8 = MeshLayout(name="fsdp8", mesh_shape={"fsdp": 8}, rules=(("act_batch", "fsdp"), ("embed", "fsdp")))


# A learning rate that moves a 6-step run (the defaults warm up over 100 steps); CLI runs get the same flags.
FAST_OPTIMIZER = {"OptimizerConfig.peak_learning_rate": 1e-2, "OptimizerConfig.warmup_steps": 2}
FAST_FLAGS = [f"--gin.{k}={v}" for k, v in FAST_OPTIMIZER.items()]


def bind_fast_optimizer():
    for key, value in FAST_OPTIMIZER.items():
        gin.bind_parameter(key, value)


@pytest.fixture(autouse=True)
def _fast_optimizer(_clean_gin):
    bind_fast_optimizer()


def restore(workdir, layout, step=None, devices=None):
    mesh = make_mesh(layout, devices or jax.devices()[:1])
    ckpt = Checkpointer(workdir)
    step = ckpt.latest_step() if step is None else step
    state, data_state, meta = ckpt.restore(step, StateSpec.build(MODEL, mesh, layout, RUN.steps).abstract)
    ckpt.close()
    return state, data_state, meta


def metrics(workdir):
    return [json.loads(line) for line in Path(workdir, "metrics.jsonl").read_text().splitlines()]


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    bind_fast_optimizer()
    train(workdir, RUN, MODEL, SINGLE)
    return workdir


def test_stop_and_resume_is_bitwise_identical(straight_run, tmp_path):
    train(tmp_path, RUN, MODEL, SINGLE, until_step=3)
    assert Checkpointer(tmp_path).latest_step() == 3
    train(tmp_path, RUN, MODEL, SINGLE)
    a, data_a, meta = restore(straight_run, SINGLE)
    b, data_b, _ = restore(tmp_path, SINGLE)
    assert int(a["step"]) == int(b["step"]) == 6
    assert_trees_equal(a, b)  # params and both Adam moments, bit for bit
    assert data_a == data_b and data_b["batches_consumed"] == 6
    seen_a = [(m["step"], m["batch_crc32"]) for m in metrics(straight_run)]
    seen_b = [(m["step"], m["batch_crc32"]) for m in metrics(tmp_path)]
    assert seen_a == seen_b and len({c for _, c in seen_a}) == 6  # same six distinct batches, same order
    # The metadata describes the model in Hugging Face names, and the run left its config and logs.
    assert meta["model_config"]["hidden_size"] == 64 and meta["layer_stack"]["stacked_axis"] == 0
    record = metrics(straight_run)[-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s", "mfu"):
        assert key in record
    assert metrics(straight_run)[-1]["loss"] < metrics(straight_run)[0]["loss"] - 0.1
    assert any(Path(straight_run, "tensorboard").iterdir())


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    train(tmp_path, TrainConfig(steps=1, batch_size=8, seq_len=32, eval_tasks=()), MODEL, FSDP_TP)
    saved, _, _ = restore(tmp_path, FSDP_TP, devices=jax.devices())
    q = saved["params"]["layers"]["self_attn"]["q_proj"]
    assert q.sharding.spec[1:3] == ("fsdp", "tensor") and len(q.addressable_shards) == 8
    on_8x1, _, _ = restore(tmp_path, FSDP8, devices=jax.devices())
    assert on_8x1["params"]["layers"]["self_attn"]["q_proj"].sharding.spec[1] == "fsdp"
    on_one, _, _ = restore(tmp_path, SINGLE)
    assert_trees_equal(saved, on_8x1)
    assert_trees_equal(saved, on_one)


def run_cli(workdir, *extra, failpoint=None):
    env = dict(os.environ, FLM_JAX_FAILPOINT=failpoint or "")  # same XLA flags as the in-process run
    bindings = [f"--gin.TeleFLMConfig.{k}={v!r}" for k, v in MODEL.to_dict().items()
                if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "max_position_embeddings", "output_mult", "mup_scale_factor",
                         "remat_policy")]
    bindings += ["--gin.TrainConfig.steps=6", "--gin.TrainConfig.batch_size=8", "--gin.TrainConfig.seq_len=32",
                 "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_tasks=()",
                 "--gin.TrainConfig.checkpoint_every=2"]
    return subprocess.run([sys.executable, "-m", "flm_jax.train", f"--workdir={workdir}", *bindings, *FAST_FLAGS,
                           *extra],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("failpoint", ["mid_step:5", "mid_save:4"])
def test_kill_9_resumes_from_last_complete_checkpoint(straight_run, tmp_path, failpoint):
    killed = run_cli(tmp_path, failpoint=failpoint)
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt = Checkpointer(tmp_path)
    latest = ckpt.latest_step()
    ckpt.close()
    # Never the step being computed, never a half-written save (an async save still in flight at the kill is lost).
    assert latest in (2, 4)
    resumed = run_cli(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from {tmp_path}/checkpoints/{latest}" in resumed.stdout
    a, _, _ = restore(straight_run, SINGLE)
    b, _, _ = restore(tmp_path, SINGLE)
    assert_trees_equal(a, b)


EXPERIMENTS = sorted(p.name for p in (REPO_ROOT / "gin/experiments").glob("*.gin"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_gin_runs_two_steps(name, tmp_path):
    out = subprocess.run([sys.executable, "-m", "flm_jax.train", f"--gin_file=gin/experiments/{name}",
                          f"--workdir={tmp_path}", "--gin.TrainConfig.steps=2", "--gin.TrainConfig.eval_every=0",
                          "--gin.TrainConfig.eval_tasks=('flm_prose',)"],
                         cwd=REPO_ROOT, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = metrics(tmp_path)[-1]
    assert last["step"] == 2 and np.isfinite(last["loss"]) and last["val_bpb"] > 0
    assert "TrainConfig.steps = 2" in Path(tmp_path, "config.gin").read_text()


def test_validation_bpb_equals_independent_nll_over_bytes(tmp_path):
    """The trainer's val_bpb = total NLL / (ln 2 x UTF-8 bytes), recomputed here from the raw snapshot, the
    SentencePiece model and an unpacked forward pass per chunk (no seqio, no packing)."""
    import gzip
    import math

    from flm_jax import data
    from flm_jax.model import TeleFLM

    seq_len = 64
    last = train(tmp_path, TrainConfig(steps=1, batch_size=8, seq_len=seq_len, eval_tasks=("flm_code",),
                                       eval_batch_size=32), MODEL, SINGLE)
    params = restore(tmp_path, SINGLE)[0]["params"]
    with gzip.open(REPO_ROOT / "flm_jax/data/assets/code.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [r["text"] for r in map(json.loads, f) if r["split"] == "validation"]
    sp = data.load_sentencepiece()
    chunks = []  # every document's tokens + EOS, cut into seq_len pieces, each read from BOS
    for text in texts:
        ids = sp.encode(text) + [data.EOS_ID]
        chunks += [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    targets = np.zeros((len(chunks), seq_len), np.int32)
    weights = np.zeros((len(chunks), seq_len), np.float32)
    for row, chunk in enumerate(chunks):
        targets[row, :len(chunk)], weights[row, :len(chunk)] = chunk, 1.0
    inputs = np.concatenate([np.full((len(chunks), 1), data.BOS_ID, np.int32), targets[:, :-1]], axis=1)
    logits = np.asarray(TeleFLM(MODEL).apply({"params": params}, inputs), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -(np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * weights).sum()
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    expected = nll / (math.log(2) * num_bytes)
    assert 1.0 < expected < 10.0
    assert last["val_bpb/flm_code"] == pytest.approx(expected, rel=1e-5)
    assert last["val_loss/flm_code"] == pytest.approx(nll / weights.sum(), rel=1e-5)


def test_resuming_with_another_model_shape_is_refused_and_keeps_the_checkpoint(straight_run):
    from flm_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"hidden_size: checkpoint 64 vs config 128.*new --workdir"):
        train(straight_run, RUN, MODEL.replace(hidden_size=128), SINGLE)
    state, _, _ = restore(straight_run, SINGLE)
    assert int(state["step"]) == 6
