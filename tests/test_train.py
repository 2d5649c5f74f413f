"""Training end to end: exact resume, restore across meshes, every experiment gin file (kills: test_preemption)."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import gin
from flm_jax.cli import REPO_ROOT, configured, load_gin
from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.training.checkpoint import Checkpointer
from flm_jax.training.config import TrainConfig
from flm_jax.training.nonfinite import NonFiniteGuard, TrainingDiverged, all_finite
from tests.helpers import (
    FAST_OPTIMIZER,
    FSDP8,
    FSDP_TP,
    MODEL,
    assert_trees_equal,
    metrics,
    restore,
    run_module,
    run_train,
)

RUN = TrainConfig(steps=6, batch_size=8, seq_len=32, log_every=1, eval_tasks=(), checkpoint_every=2)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    run_train(workdir, RUN)
    return workdir


def test_stop_and_resume_is_bitwise_identical(straight_run, tmp_path, capsys):
    run_train(tmp_path, RUN, until_step=3)
    assert Checkpointer(tmp_path).latest_step() == 3
    run_train(tmp_path, RUN)
    # the data position came back from the checkpoint's tf.data snapshot, not by replaying 3 batches
    assert "reads shards [0] of 1 (8 of 8 rows per batch); resumed at batch 3 from iterator snapshots." in (
        capsys.readouterr().err
    )
    a, data_a, meta = restore(straight_run)
    b, data_b, _ = restore(tmp_path)
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
    run_train(tmp_path, TrainConfig(steps=1, batch_size=8, seq_len=32, eval_tasks=()), layout=FSDP_TP)
    saved, _, _ = restore(tmp_path, FSDP_TP, devices=jax.devices())
    q = saved["params"]["layers"]["self_attn"]["q_proj"]
    assert q.sharding.spec[1:3] == ("fsdp", "tensor") and len(q.addressable_shards) == 8
    on_8x1, _, _ = restore(tmp_path, FSDP8, devices=jax.devices())
    assert on_8x1["params"]["layers"]["self_attn"]["q_proj"].sharding.spec[1] == "fsdp"
    on_one, _, _ = restore(tmp_path)
    assert_trees_equal(saved, on_8x1)
    assert_trees_equal(saved, on_one)


EXPERIMENTS = sorted(p.name for p in (REPO_ROOT / "gin/experiments").glob("*.gin"))
# Experiments whose full shape takes long here (a benchmark's) or does not fit (a GPU's, ~1B parameters) run their
# code path at a smaller shape: the same head_dim, and bench_cpu's width, unrolled stack and float32.
CPU_SHAPES = {
    "bench_cpu.gin": {"TeleFLMConfig.num_hidden_layers": 2, "TeleFLMConfig.scan_unroll": 2, "TrainConfig.seq_len": 128},
    "bench_gpu_1b.gin": {
        "TeleFLMConfig.hidden_size": 256,
        "TeleFLMConfig.intermediate_size": 512,
        "TeleFLMConfig.num_hidden_layers": 2,
        "TeleFLMConfig.num_attention_heads": 2,
        "TeleFLMConfig.num_key_value_heads": 2,
        "TrainConfig.batch_size": 2,
        "TrainConfig.seq_len": 128,
    },
}


def configured_hidden_size(name: str) -> int:
    """The hidden size that gin/experiments/<name> (with its CPU shape) gives TeleFLMConfig."""
    with gin.unlock_config():
        gin.clear_config()
        load_gin([f"gin/experiments/{name}"], [f"{k} = {v!r}" for k, v in CPU_SHAPES.get(name, {}).items()])
        hidden = configured(TeleFLMConfig).hidden_size
        gin.clear_config()
    return hidden


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_gin_runs_two_steps(name, tmp_path):
    out = run_module(
        "flm_jax.train",
        f"--gin_file=gin/experiments/{name}",
        f"--workdir={tmp_path}",
        "--gin.TrainConfig.steps=2",
        "--gin.TrainConfig.eval_every=0",
        "--gin.TrainConfig.eval_tasks=('flm_prose',)",
        "--gin.TrainConfig.eval_split='minival'",  # the small fixed validation set: the run, not the score, is tested
        *(f"--gin.{k}={v!r}" for k, v in CPU_SHAPES.get(name, {}).items()),
        env={"XLA_FLAGS": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # A CPU host's console shows no GPU probing (TensorFlow's start-up reports are filtered in flm_jax/data/_tf.py).
    assert not re.search("cuInit|cuda", out.stderr, re.IGNORECASE), out.stderr[-3000:]
    assert "target_byte_size" not in out.stderr  # orbax's warning about one-layer chunks, at every save
    last = metrics(tmp_path)[-1]
    assert last["step"] == 2 and np.isfinite(last["loss"]) and last["val_bpb"] > 0
    config_gin = Path(tmp_path, "config.gin").read_text()
    hidden = configured_hidden_size(name)
    assert hidden >= 256 and "TrainConfig.steps = 2" in config_gin
    assert f"TeleFLMConfig.hidden_size = {hidden}" in config_gin  # the experiment's model, not a default
    assert "peak_flops_per_device.override = 178000000000.0" in config_gin  # the CPU peak MFU divided by


def test_validation_bpb_equals_independent_nll_over_bytes(tmp_path):
    """The trainer's val_bpb = total NLL / (ln 2 x UTF-8 bytes), recomputed here from the raw snapshot, the
    SentencePiece model and an unpacked forward pass per chunk (no seqio, no packing)."""
    import gzip
    import math

    from flm_jax import data
    from flm_jax.model import TeleFLM

    seq_len = 64
    last = run_train(
        tmp_path, TrainConfig(steps=1, batch_size=8, seq_len=seq_len, eval_tasks=("flm_code",), eval_batch_size=32)
    )
    params = restore(tmp_path)[0]["params"]
    with gzip.open(REPO_ROOT / "flm_jax/data/assets/code.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [r["text"] for r in map(json.loads, f) if r["split"] == "validation"]
    sp = data.load_sentencepiece()
    chunks = []  # every document's tokens + EOS, cut into seq_len pieces, each read from BOS
    for text in texts:
        ids = sp.encode(text) + [data.EOS_ID]
        chunks += [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    targets = np.zeros((len(chunks), seq_len), np.int32)
    weights = np.zeros((len(chunks), seq_len), np.float32)
    for row, chunk in enumerate(chunks):
        targets[row, : len(chunk)], weights[row, : len(chunk)] = chunk, 1.0
    inputs = np.concatenate([np.full((len(chunks), 1), data.BOS_ID, np.int32), targets[:, :-1]], axis=1)
    logits = np.asarray(TeleFLM(MODEL).apply({"params": params}, inputs), np.float64)
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    nll = -(np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * weights).sum()
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    expected = nll / (math.log(2) * num_bytes)
    assert 1.0 < expected < 10.0
    assert last["val_bpb/flm_code"] == pytest.approx(expected, rel=1e-5)
    assert last["val_loss/flm_code"] == pytest.approx(nll / weights.sum(), rel=1e-5)


def test_resuming_with_another_model_shape_is_refused_and_keeps_the_checkpoint(straight_run):
    with pytest.raises(ConfigError, match=r"hidden_size: checkpoint 64 vs config 128.*new --workdir"):
        run_train(straight_run, RUN, model=MODEL.replace(hidden_size=128))
    state, _, _ = restore(straight_run)
    assert int(state["step"]) == 6


# What the pre-restructure code logged when it resumed tests/fixtures/legacy_grown_workdir (a 1-layer d=16 model,
# trained 2 steps, MSG-grown to 2 layers d=32 with a 4-step ramp) to step 6: step, loss, mask, batch CRC32.
LEGACY_RESUME = [
    (3, 7.622369766235352, 0.0, 2379013445),
    (4, 7.60430908203125, 0.25, 1514842668),
    (5, 7.598598480224609, 0.5, 1292582925),
    (6, 7.555919170379639, 0.75, 2482631332),
]


def test_a_workdir_written_by_the_previous_layout_resumes_exactly(tmp_path):
    """The old config.gin (with bindings that no longer exist), the old metadata and the mid-ramp MSG state load;
    the resumed run logs exactly what the old code logged."""
    workdir = tmp_path / "legacy"
    shutil.copytree(REPO_ROOT / "tests/fixtures/legacy_grown_workdir", workdir)
    assert "make_optimizer.optimizer" in (workdir / "config.gin").read_text()
    out = run_module("flm_jax.train", f"--workdir={workdir}", "--gin.TrainConfig.steps=6", env={"XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    logged = [(m["step"], m["loss"], m["growth_mask"], m["batch_crc32"]) for m in metrics(workdir)]
    assert logged == LEGACY_RESUME
    ckpt = Checkpointer(workdir)
    assert ckpt.metadata(6)["grown_from"]["step"] == 2 and "growth" not in ckpt.metadata(6)  # ramp over at step 6
    ckpt.close()
    assert "make_optimizer.optimizer" not in (workdir / "config.gin").read_text()


def test_a_run_whose_gin_files_name_no_model_stops_with_the_fix(tmp_path):
    out = run_module(
        "flm_jax.train", "--gin_file=gin/meshes/single.gin", f"--workdir={tmp_path}", env={"XLA_FLAGS": ""}
    )
    assert out.returncode == 2
    assert "TeleFLMConfig" in out.stderr and "Include a model gin file" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "checkpoints").exists()


def test_non_finite_steps_are_skipped_counted_and_a_run_of_them_stops_naming_the_last_good_checkpoint(tmp_path):
    """A learning rate of 1e30 makes step 1's update finite but huge, so every later gradient overflows: those
    updates are skipped (checkpoints 2 and 3 hold the same state), counted, and the third in a row stops the run."""
    cfg = dataclasses.replace(RUN, steps=10, checkpoint_every=1, max_nonfinite_steps=3, async_checkpointing=False)
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row up to step 4 .*/checkpoints/3 \(step 3\)"):
        run_train(tmp_path, cfg, optimizer=dataclasses.replace(FAST_OPTIMIZER, peak_learning_rate=1e30))
    records = metrics(tmp_path)
    assert [r["nonfinite"] for r in records] == [0, 1, 1]
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 2]
    assert np.isfinite(records[0]["grad_norm"]) and not np.isfinite(records[1]["grad_norm"])
    (state2, _, _), (state3, _, _) = restore(tmp_path, step=2), restore(tmp_path, step=3)
    assert_trees_equal(state2["params"], state3["params"])
    assert_trees_equal(state2["opt_state"], state3["opt_state"])
    assert all_finite(state3["params"]) and int(state3["step"]) == 3
    with pytest.raises(TrainingDiverged, match=r"parameters at step 7 are not finite; no checkpoint was written"):
        NonFiniteGuard(3).check_saveable({"w": np.array([1.0, np.nan])}, 7, "x")
