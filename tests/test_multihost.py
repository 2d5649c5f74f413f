"""Two processes x 4 CPU devices joined by jax.distributed run the same train entry point as one host."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from flm_jax.cli import REPO_ROOT
from flm_jax.optim import OptimizerConfig
from flm_jax.training.config import TrainConfig
from tests.helpers import FSDP8, MODEL, MODEL_FLAGS, run_train

FLAGS = [
    "--gin_file=gin/meshes/fsdp.gin",
    *MODEL_FLAGS,
    "--gin.TrainConfig.steps=2",
    "--gin.TrainConfig.batch_size=8",
    "--gin.TrainConfig.seq_len=32",
    "--gin.TrainConfig.log_every=1",
    "--gin.TrainConfig.eval_tasks=()",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_host(tmp_path):
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flm_jax.train",
                f"--workdir={tmp_path / 'multi'}",
                *FLAGS,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "loss" in outs[0][0] and "loss" not in outs[1][0]  # only process 0 prints progress
    for i, (_, err) in enumerate(outs):  # each process reads, tokenises and packs only its half of every batch
        assert f"Input: process {i} of 2 reads shards [{i}] of 2 (4 of 8 rows per batch)." in err
    multi = [json.loads(x) for x in Path(tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in multi] == [1, 2]  # only process 0 writes metrics
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["1", "2"]

    # One process with 8 devices reading both input shards sees the same batches and the same losses.
    run_train(
        tmp_path / "single",
        TrainConfig(steps=2, batch_size=8, seq_len=32, log_every=1, eval_tasks=(), input_shards=2),
        model=MODEL,
        layout=FSDP8,
        optimizer=OptimizerConfig(),
    )
    single = [json.loads(x) for x in Path(tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([m["loss"] for m in multi], [m["loss"] for m in single], rtol=1e-5)
