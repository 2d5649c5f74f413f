"""Workdirs as URIs: every run path goes through flm_jax.paths (etils.epath), so `gs://bucket/run` stays a bucket
URI and `file:///x` is the local /x; a schedule's relative workdir is the caller's. (No bucket is reachable
offline, and orbax/tensorstore accept no in-memory fsspec filesystem, so the remote case is checked as paths.)"""

import json
import os

from flm_jax.cli import REPO_ROOT
from flm_jax.growth.checkpoint import grow_checkpoint
from flm_jax.growth.spec import GrowthSpec
from flm_jax.hf.export import export
from flm_jax.paths import as_path, is_remote
from flm_jax.training.checkpoint import checkpoint_dir
from flm_jax.training.checkpoint_reader import read_train_state
from flm_jax.training.config import TrainConfig
from tests.helpers import MODEL_FLAGS, SINGLE, assert_trees_equal, run_module, run_train


def test_bucket_uris_stay_uris_and_local_paths_become_absolute(tmp_path, monkeypatch):
    bucket = as_path("gs://flm-bucket/runs/52b")
    assert is_remote(bucket) and str(checkpoint_dir(bucket)) == "gs://flm-bucket/runs/52b/checkpoints"
    assert str(as_path("file:///data/run")) == "/data/run" and not is_remote("file:///data/run")
    monkeypatch.chdir(tmp_path)
    assert str(as_path("runs/x")) == f"{tmp_path}/runs/x"


def test_a_file_uri_workdir_trains_resumes_grows_and_exports(tmp_path):
    run = TrainConfig(steps=3, batch_size=8, seq_len=32, log_every=1, eval_tasks=(), checkpoint_every=2)
    uri = f"file://{tmp_path}/run"
    run_train(uri, run, until_step=2)
    run_train(uri, run)  # resumes from step 2
    run_train(tmp_path / "straight", run)
    assert_trees_equal(read_train_state(uri)[1], read_train_state(tmp_path / "straight")[1])
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints", "metrics.jsonl", "tensorboard"]
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    spec = GrowthSpec(hidden_size=96, num_attention_heads=6, intermediate_size=192)
    report = grow_checkpoint(uri, f"file://{tmp_path}/grown", spec, SINGLE)
    assert report["max_abs_dlogit"] < 1e-4 and (tmp_path / "grown" / "growth.json").is_file()
    export(uri, f"file://{tmp_path}/hf", tokenizer="none", progress=lambda _: None)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hf"))
    assert not any("file:" in p for p in os.listdir(tmp_path))


def test_a_schedule_resolves_its_relative_workdir_and_gin_files_against_the_callers_directory(tmp_path):
    (tmp_path / "stage.gin").write_text(
        "\n".join(
            [
                *[f.removeprefix("--gin.").replace("=", " = ", 1) for f in MODEL_FLAGS],
                "TrainConfig.batch_size = 8",
                "TrainConfig.seq_len = 32",
                "TrainConfig.eval_tasks = ()",
                "MeshLayout.mesh_shape = {'data': 1}",
            ]
        )
    )
    (tmp_path / "schedule.gin").write_text("stages.stages = [{'steps': 1, 'gin_files': ['stage.gin']}]\n")
    out = run_module(
        "flm_jax.schedule",
        f"--gin_file={tmp_path / 'schedule.gin'}",
        "--workdir=sched",
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO_ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "sched" / "stage1" / "checkpoints" / "1").is_dir()
    assert (tmp_path / "sched" / "schedule.json").is_file() and not (REPO_ROOT / "sched").exists()
