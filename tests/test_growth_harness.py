"""The in-memory growth harness (flm_jax/growth/harness.py): FLOPs and loss accounting, the compute-saving rule, the
recipes' learning-rate and optimizer-state policies, and the two experiment scripts run as files."""

import json
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from flm_jax.cli import REPO_ROOT
from flm_jax.growth import GrowthSpec
from flm_jax.growth.harness import Curve, Recipe, Stage, compute_saving, experiment_data, run_schedule
from flm_jax.optim import OptimizerConfig
from flm_jax.training.short_runs import proxy_config


def curve(flops, losses):
    c = Curve()
    for i, (f, v) in enumerate(zip(flops, losses)):
        c.add(i, f, float(i), v)
    return c


def test_compute_saving_interpolates_the_flops_at_the_scratch_runs_final_loss():
    scratch = curve([0, 10, 20, 30], [8.0, 6.0, 5.0, 4.5])
    grown = curve([0, 5, 10, 15], [8.0, 5.5, 4.0, 3.9])  # 4.5 is crossed 2/3 of the way from FLOPs 5 to 10
    result = compute_saving(scratch, grown)
    assert result["grown_reached_scratch_loss"] and result["matched_loss"] == 4.5
    assert result["compute_saving"] == pytest.approx(30 / (25 / 3))
    # Never reached: the scratch run's FLOPs to the grown final loss (5.0 at 20) over all the grown FLOPs (40) ...
    worse = curve([0, 20, 40], [8.0, 6.0, 5.0])
    result = compute_saving(scratch, worse)
    assert not result["grown_reached_scratch_loss"] and result["compute_saving"] == pytest.approx(20 / 40)
    # ... which is a saving when the grown schedule got there on less compute (5.0 at 12 against the scratch's 20).
    assert compute_saving(scratch, curve([0, 6, 12], [8.0, 6.0, 5.0]))["compute_saving"] == pytest.approx(20 / 12)


@pytest.fixture(scope="module")
def schedule_run():
    small = proxy_config(32, 32, 2, 16, 32)
    train_batch, evals = experiment_data(4, 32, 24, 1)
    spec = GrowthSpec(hidden_size=48, num_attention_heads=3, intermediate_size=120, num_hidden_layers=3, ramp_steps=4)
    optimizer = OptimizerConfig(peak_learning_rate=3e-3, warmup_steps=2)
    with jax.default_device(jax.devices("cpu")[0]):
        first, trained = run_schedule(small, [Stage(12)], optimizer, train_batch, evals, 6)
        runs = {
            policy: run_schedule(small, [Stage(12, spec)], optimizer, train_batch, evals, 6, 0, recipe, trained)
            for policy, recipe in {
                "rewarm": Recipe(),
                "continue": Recipe(lr_policy="continue"),
                "reset": Recipe(opt_policy="reset"),
                "rewarm again": Recipe(),
            }.items()
        }
    return small, spec, first, trained, runs


def test_the_harness_counts_flops_per_stage_and_measures_the_jump_after_growth(schedule_run):
    small, spec, first, trained, runs = schedule_run
    grown_curve, grown = runs["rewarm"]
    seq_len, tokens = 32, 4 * 32
    big = grown["config"]
    assert big.hidden_size == 48 and big.num_hidden_layers == 3 and grown["step"] == 24
    expected = 12 * small.flops_per_token(seq_len) * tokens + 12 * big.flops_per_token(seq_len) * tokens
    assert grown_curve.flops[-1] == pytest.approx(expected, rel=1e-12)
    assert grown_curve.steps[: len(first.steps)] == first.steps  # the shared first stage is the same curve
    assert {14, 17, 22} <= set(grown_curve.steps) and len(grown_curve.train_loss) == 24
    (growth,) = grown_curve.growths
    assert growth["step"] == 12 and growth["loss_before"] == pytest.approx(first.final_loss)
    after = [v for s, v in zip(grown_curve.steps, grown_curve.val_loss) if s in (14, 17, 22)]
    assert growth["jump"] == pytest.approx(max(after) - growth["loss_before"])
    # The shared first stage survives the runs that start from it (the train step donates its state): a second run
    # of the same recipe reproduces the first.
    assert np.isfinite(np.asarray(trained["params"]["lm_head"])).all()
    assert runs["rewarm again"][0].val_loss == grown_curve.val_loss


def test_recipes_change_the_run_after_growth(schedule_run):
    _, _, _, _, runs = schedule_run
    finals = {name: runs[name][0].final_loss for name in ("rewarm", "continue", "reset")}
    assert len(set(finals.values())) == 3, finals  # each policy trains differently from the same checkpoint

    def adam_count(opt_state):
        is_adam = lambda n: isinstance(n, optax.ScaleByAdamState)  # noqa: E731
        (adam,) = [n for n in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(n)]
        return int(adam.count)

    assert adam_count(runs["reset"][1]["opt_state"]) == 12  # a reset Adam counts from the growth on
    assert adam_count(runs["rewarm"][1]["opt_state"]) == 24


@pytest.mark.parametrize("script", ["growth_vs_scratch", "growth_ablations"])
def test_the_experiment_scripts_run_as_files_and_write_their_results(script, tmp_path):
    out = subprocess.run(
        [sys.executable, f"experiments/{script}.py", f"--out={tmp_path}", "--smoke"]
        + (["--only=combined,continue"] if script == "growth_ablations" else []),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / f"{script}.json").read_text())
    assert (tmp_path / f"{script}.png").stat().st_size > 10_000
    if script == "growth_vs_scratch":
        for key in ("scratch_final_loss", "grown_final_loss", "scratch_flops", "grown_flops"):
            assert np.isfinite(result[key]) and result[key] > 0, key
        assert result["compute_saving"] > 0
        assert result["grown"]["flops"][-1] == result["grown_flops"]
    else:
        assert list(result["recipes"]) == [
            "base (msg sublayer, even, mean nu, rewarm)",
            "lr: continue decayed",
            "combined: distance + new nu 0",
        ]
        assert (tmp_path / "growth_ablations.md").read_text().count("\n|") == 2 + 3
        assert all(len(r["per_seed"]["final"]) == result["seeds"] == 1 for r in result["recipes"].values())
        assert result["recipes"]["base (msg sublayer, even, mean nu, rewarm)"]["vs_base"] == 0
