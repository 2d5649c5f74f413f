"""Two processes x 4 CPU devices joined by jax.distributed run the same entry points as one host: train (each
process reading only its input shards), then grow, export and import_hf on the checkpoint they wrote."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from flm_jax.cli import REPO_ROOT
from flm_jax.growth.checkpoint import grow_checkpoint
from flm_jax.growth.spec import GrowthSpec
from flm_jax.hf.export import export
from flm_jax.hf.importer import import_hf
from flm_jax.optim import OptimizerConfig
from flm_jax.training.checkpoint_reader import read_train_state
from flm_jax.training.config import TrainConfig
from tests import multihost_tools
from tests.helpers import FSDP8, MODEL, assert_trees_equal, run_train, xla_flags


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(*argv: str) -> list[tuple[str, str]]:
    """Run `python argv... --process_id=I` as processes 0 and 1 (4 CPU devices each); their (stdout, stderr)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, *argv, f"--process_id={i}"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One 2-process run of train -> grow -> export -> import_hf (tests/multihost_tools.py): (root, outputs)."""
    root = tmp_path_factory.mktemp("multihost")
    (root / "grow.gin").write_text(multihost_tools.GROW_GIN)
    return root, run_two_processes("-m", "tests.multihost_tools", f"--root={root}", f"--port={free_port()}")


def test_two_processes_train_like_one_host(two_processes, tmp_path):
    root, outs = two_processes
    assert "loss" in outs[0][0] and "loss" not in outs[1][0]  # only process 0 prints progress
    for i, (_, err) in enumerate(outs):  # each process reads, tokenises and packs only its half of every batch
        assert f"Input: process {i} of 2 reads shards [{i}] of 2 (4 of 8 rows per batch)." in err
    multi = [json.loads(x) for x in Path(root / "src" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in multi] == [1, 2]  # only process 0 writes metrics
    assert sorted(os.listdir(root / "src" / "checkpoints")) == ["1", "2"]

    # One process with 8 devices reading both input shards sees the same batches and the same losses.
    run_train(
        tmp_path / "single",
        TrainConfig(
            steps=2,
            batch_size=8,
            seq_len=32,
            log_every=1,
            eval_tasks=("flm_prose",),
            eval_split="minival",
            input_shards=2,
        ),
        model=MODEL,
        layout=FSDP8,
        optimizer=OptimizerConfig(),
    )
    single = [json.loads(x) for x in Path(tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    losses = np.array([[m["loss"] for m in multi], [m["loss"] for m in single]])
    print(
        "2 processes vs 1, loss per step:",
        losses.tolist(),
        "max relative difference:",
        (np.ptp(losses, 0) / losses[1]).max(),
    )
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    # the validation documents, packed per process into other rows, sum to the same loss
    np.testing.assert_allclose([m["val_loss"] for m in multi], [m["val_loss"] for m in single], rtol=1e-5)


def test_two_processes_grow_export_and_import_like_one_host(two_processes, tmp_path):
    """Each tool's output from the 2-process run equals the same tool's on one process with 8 devices, run here
    on the checkpoint the two processes trained."""
    root, outs = two_processes
    # process 0 wrote every other safetensors file, process 1 the rest (each read only those tensors)
    files, mine = map(int, re.search(r"\((\d+) files, (\d+) of them by this process of 2\)", outs[0][0]).groups())
    assert files > 2 and mine == (files + 1) // 2

    spec = GrowthSpec(
        hidden_size=96, num_attention_heads=6, intermediate_size=192, num_hidden_layers=3, layer_strategy="distance"
    )
    report = grow_checkpoint(root / "src", tmp_path / "grown_1", spec, FSDP8)
    two, one = read_train_state(root / "grown")[1], read_train_state(tmp_path / "grown_1")[1]
    assert_trees_equal(two["params"], one["params"])
    # Adam's nu of new embedding columns is a mean over the old ones: a cross-process all-reduce sums in another
    # order (measured: 1 ulp, 1.1e-7 relative)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), two["opt_state"], one["opt_state"])
    grown = json.loads((root / "grown" / "growth.json").read_text())
    assert grown["max_abs_dlogit"] < 1e-4 and grown["target_params"] > grown["source_params"]
    # the layer distances that chose where the new layer goes, measured with parameters sharded over two processes
    assert len(grown["layer_distances"]) == 2 and min(grown["layer_distances"]) > 0
    np.testing.assert_allclose(grown["layer_distances"], report["layer_distances"], rtol=1e-5)
    assert grown["layer_order"] == [list(entry) for entry in report["layer_order"]]

    export(root / "src", tmp_path / "hf_1", tokenizer="none", max_shard_size="300KB", progress=lambda _: None)
    files = sorted(os.listdir(root / "hf"))
    assert files == sorted(os.listdir(tmp_path / "hf_1")) and len([f for f in files if f.endswith(".safetensors")]) > 2
    for name in files:
        assert (root / "hf" / name).read_bytes() == (tmp_path / "hf_1" / name).read_bytes(), name

    import_hf(root / "hf", tmp_path / "imported_1", FSDP8)
    imported = read_train_state(root / "imported")[1]["params"]
    assert_trees_equal(imported, read_train_state(tmp_path / "imported_1")[1]["params"])
    trained = read_train_state(root / "src")[1]["params"]  # exported with μP folded in, imported unfolded
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), imported, trained)
