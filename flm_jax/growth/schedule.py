"""A growth schedule, Tele-FLM style: train, grow, train, grow, train, each stage in WORKDIR/stage<i>; the library
behind `python -m flm_jax.schedule`.

A stage is {"steps": the step it trains to (the count runs on across stages), "gin_files": [gin files of its
training run], "growth": a growth gin file (stages after the first)}. Every stage runs `flm_jax.train` (and, from
the second stage on, `flm_jax.grow` first) in its own process, so each sees only its own gin config: a grown
stage trains with the config.gin that grow wrote (the grown model) followed by its own gin files. Finished stages
are skipped when the schedule runs again.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from etils import epath

import gin
from flm_jax.cli import REPO_ROOT, resolve_gin_file
from flm_jax.config import ConfigError
from flm_jax.files import atomic_write_bytes
from flm_jax.paths import PathLike
from flm_jax.training.checkpoint import CONFIG_GIN, Checkpointer

STAGE_KEYS = ("steps", "gin_files", "growth")


@gin.configurable
def stages(stages: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The stages of the schedule gin file (see the module docstring)."""
    if not stages:
        raise ConfigError("no stages: bind stages.stages in the schedule gin file.")
    for i, stage in enumerate(stages, start=1):
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        if unknown or "steps" not in stage:
            raise ConfigError(
                f"stage {i} of stages.stages has keys {sorted(stage)}; a stage has 'steps' and "
                f"optionally 'gin_files' and 'growth' (put bindings in a stage gin file)."
            )
    # Resolved now against the caller's working directory (then the repository root, where the stages' processes
    # run), not when a later stage starts after the earlier ones have trained.
    return [_resolved(i, stage) for i, stage in enumerate(stages, start=1)]


def _resolved(i: int, stage: dict[str, Any]) -> dict[str, Any]:
    def path(name: str) -> str:
        try:
            return resolve_gin_file(name)
        except FileNotFoundError as e:
            raise ConfigError(f"stage {i} of stages.stages: {e} Fix its path in the schedule gin file.") from None

    resolved = dict(stage, gin_files=[path(f) for f in stage.get("gin_files", [])])
    if stage.get("growth"):
        resolved["growth"] = path(stage["growth"])
    return resolved


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", *cmd], check=True, cwd=REPO_ROOT)
    return time.time() - started


def metrics(workdir: epath.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_schedule(workdir: epath.Path, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for i, stage in enumerate(plan, start=1):
        stage_dir, row = workdir / f"stage{i}", {"stage": i}
        gin_files = [f"--gin_file={f}" for f in stage.get("gin_files", [])]
        if i > 1 and stage.get("growth"):
            if not (stage_dir / "growth.json").exists():
                row["grow_seconds"] = run(
                    [
                        "flm_jax.grow",
                        f"--gin_file={stage['growth']}",
                        f"--from_workdir={workdir / f'stage{i - 1}'}",
                        f"--workdir={stage_dir}",
                    ]
                )
            row["growth"] = json.loads((stage_dir / "growth.json").read_text())
            gin_files.insert(0, f"--gin_file={stage_dir / CONFIG_GIN}")  # the grown model
        latest = Checkpointer(stage_dir).latest_step() if (stage_dir / "checkpoints").exists() else None
        if latest is None or latest < stage["steps"]:
            row["train_seconds"] = run(
                ["flm_jax.train", *gin_files, f"--workdir={stage_dir}", f"--gin.TrainConfig.steps={stage['steps']}"]
            )
        logged = metrics(stage_dir)
        evaluated = [m for m in logged if "val_loss" in m]
        row.update(
            steps=stage["steps"],
            first_loss=logged[0]["loss"] if logged else None,
            last_loss=logged[-1]["loss"] if logged else None,
            start_val_loss=evaluated[0]["val_loss"] if evaluated else None,
            val_loss=evaluated[-1]["val_loss"] if evaluated else None,
            val_bpb=evaluated[-1]["val_bpb"] if evaluated else None,
            tokens_per_sec=logged[-1]["tokens_per_sec"] if logged else None,
            curve=stage_curve(logged, rows[-1]["curve"][-1] if rows and rows[-1]["curve"] else None),
        )
        rows.append(row)
    return rows


def stage_curve(logged: list[dict], previous: list | None) -> list[list]:
    """[step, training loss, validation loss or None, cumulative training FLOPs] per logged step, the FLOPs
    counted on from the previous stage's last point (its step and FLOPs)."""
    step0, flops0 = (previous[0], previous[3]) if previous else (0, 0.0)
    return [
        [m["step"], m["loss"], m.get("val_loss"), flops0 + (m["step"] - step0) * m.get("flops_per_step", 0.0)]
        for m in logged
    ]


def plot_schedule(rows: list[dict[str, Any]], path: PathLike) -> None:
    """Training loss (and validation loss where evaluated) of every stage against step and against training FLOPs,
    growth points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for x, ax in enumerate(axes):  # x: 0 step, 3 FLOPs (the curve's columns)
        x = 3 * x
        for row in rows:
            if not row["curve"]:
                continue
            curve = row["curve"]
            params = row["growth"]["target_params"] if "growth" in row else None
            label = f"stage {row['stage']}" + (f" ({params / 1e6:.1f}M)" if params else "")
            line = ax.plot([c[x] for c in curve], [c[1] for c in curve], marker=".", label=label)[0]
            evaluated = [(c[x], c[2]) for c in curve if c[2] is not None]
            if evaluated:
                ax.plot(*zip(*evaluated), "s--", color=line.get_color(), alpha=0.6, label=f"stage {row['stage']} val")
            if "growth" in row:
                g = row["growth"]
                ax.axvline(curve[0][x] if x else g["step"], color="grey", linestyle=":")
                ax.annotate(
                    f"grow {g['source_params'] / 1e6:.1f}M -> {g['target_params'] / 1e6:.1f}M",
                    (curve[0][x] if x else g["step"], 0.98),
                    xycoords=ax.get_xaxis_transform(),  # x in data, y as a fraction of the axes
                    rotation=90,
                    va="top",
                    ha="right",
                    fontsize=8,
                )
        ax.set(xlabel="training FLOPs" if x else "step", title=f"loss per stage against {'FLOPs' if x else 'step'}")
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        if "growth" in row:
            g = row["growth"]
            lines.append(
                f"growth into stage {row['stage']}: {g['source_params']:,} -> {g['target_params']:,} "
                f"parameters, probe loss {g['loss_before']:.4f} -> {g['loss_after']:.4f}, max |Δlogit| "
                f"{g['max_abs_dlogit']:.2e}, {g['grow_seconds']:.1f} s, peak RSS {g['peak_rss_mib']:.0f} MiB"
            )
    lines.append(
        f"{'stage':>5} {'to step':>8} {'first loss':>10} {'last loss':>10} {'val start':>9} {'val end':>9} "
        f"{'val bpb':>8} {'tok/s':>7} {'train s':>8}"
    )
    for row in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"{row['stage']:>5} {row['steps']:>8} {fmt(row['first_loss'], '10.4f')} "
            f"{fmt(row['last_loss'], '10.4f')} {fmt(row.get('start_val_loss'), '9.4f')} "
            f"{fmt(row['val_loss'], '9.4f')} {fmt(row['val_bpb'], '8.4f')} "
            f"{fmt(row['tokens_per_sec'], '7.0f')} {fmt(row.get('train_seconds'), '8.1f')}"
        )
    return "\n".join(lines)
