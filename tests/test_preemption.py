"""Crash safety from outside the process: `python -m flm_jax.train` killed with SIGKILL at random moments (during
steps and during asynchronous saves), then stopped by SIGTERM (preemption), resumes every time and ends bitwise
equal to an uninterrupted run. The runs are forked from one process that imported flm_jax.train once
(tests/forked_train.py): twelve starts without twelve interpreters' imports."""

import random
import re
import signal
import time

import pytest

from flm_jax.training.checkpoint import Checkpointer
from flm_jax.training.config import TrainConfig
from tests import forked_train
from tests.helpers import FAST_FLAGS, MODEL_FLAGS, assert_trees_equal, restore, run_train

STEPS = 40
# A checkpoint at every step (asynchronous, three kept): most moments of the run are inside a save or a cleanup.
RUN = TrainConfig(steps=STEPS, batch_size=8, seq_len=32, log_every=1, eval_tasks=(), checkpoint_every=1)
TRIALS = 10
PROGRESS = re.compile(r"^\[\s*(\d+)/")


@pytest.fixture(scope="module")
def server():
    server = forked_train.Server()
    yield server
    server.close()


def start(server: forked_train.Server, workdir, log) -> forked_train.Run:
    flags = [f"--gin.TrainConfig.{k}={getattr(RUN, k)!r}" for k in ("steps", "batch_size", "seq_len", "log_every")]
    flags += ["--gin.TrainConfig.eval_tasks=()", "--gin.TrainConfig.checkpoint_every=1"]
    argv = ["--gin_file=gin/meshes/single.gin", f"--workdir={workdir}", *MODEL_FLAGS, *flags, *FAST_FLAGS]
    return server.start(argv, log)


def wait_for_step(run: forked_train.Run, step: int) -> list[str]:
    """Read the run's progress until it reports `step`; the lines read."""
    lines = []
    for line in run.lines():
        lines.append(line)
        m = PROGRESS.match(line)
        if m and int(m.group(1)) >= step:
            return lines
    raise AssertionError(f"the run ended before step {step}: {lines[-5:]}")


def latest(workdir) -> int | None:
    ckpt = Checkpointer(workdir)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def in_flight_saves(workdir) -> list[str]:
    return [p.name for p in (workdir / "checkpoints").glob("*orbax-checkpoint-tmp*")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_train(workdir, RUN)
    return restore(workdir)[0]


def test_sigkill_at_random_moments_and_sigterm_always_resume_to_the_uninterrupted_run(
    uninterrupted, server, tmp_path_factory
):
    tmp_path, logs = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("logs")
    rng = random.Random(13)
    outcomes = []
    for trial in range(TRIALS):
        before = latest(tmp_path)
        proc = start(server, tmp_path, logs / f"kill_{trial}.log")
        seen = wait_for_step(proc, (before or 0) + rng.randint(1, 3))
        if before is not None:
            assert f"Resumed from {tmp_path}/checkpoints/{before}." in "".join(seen)
        time.sleep(rng.uniform(0, 0.3))  # somewhere in the next step or its save
        partial = in_flight_saves(tmp_path)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        left = in_flight_saves(tmp_path)  # before a CheckpointManager (latest, restore) cleans them up
        step = latest(tmp_path)
        # The latest complete checkpoint restores; a save cut short is never picked up. A kill before the first
        # save completed leaves none (seen with the other test worker slowing the save): the next start is fresh.
        if step is not None:
            state, data_state, _ = restore(tmp_path)
            assert int(state["step"]) == step == data_state["batches_consumed"]
        assert all(int(name.split(".")[0]) > (step or 0) for name in left), (left, step)
        outcomes.append(
            {"trial": trial, "from": before, "after_kill": step, "saving_at_kill": partial, "partial_left": left}
        )
    print("kill trials:", *outcomes, sep="\n  ")
    assert any(o["saving_at_kill"] for o in outcomes), "no kill landed during a save: the trials test too little"
    restored = sum(o["after_kill"] is not None for o in outcomes)
    assert restored >= TRIALS // 2, f"only {restored} kills left a checkpoint to restore: the trials test too little"

    # SIGTERM (preemption): the run finishes its step, saves it and exits 0; the next start resumes from it.
    before = latest(tmp_path)
    proc = start(server, tmp_path, logs / "sigterm.log")
    wait_for_step(proc, before + 2)
    proc.send_signal(signal.SIGTERM)
    rest = "".join(proc.lines(timeout=120))
    assert proc.wait() == 0, rest[-2000:]
    stopped = latest(tmp_path)
    assert f"[{stopped:>6}/{STEPS}] preempted (SIGTERM): saved this step" in rest
    assert not in_flight_saves(tmp_path) and before + 2 <= stopped < STEPS

    final = start(server, tmp_path, logs / "final.log")
    out = "".join(final.lines())
    assert final.wait() == 0, out[-2000:]
    assert f"Resumed from {tmp_path}/checkpoints/{stopped}." in out
    assert_trees_equal(uninterrupted, restore(tmp_path)[0])  # params and Adam moments, bit for bit
