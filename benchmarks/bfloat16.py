"""bfloat16 compute with float32 master weights against float32: the tiny pretraining's loss curve, and the speed.

    python -m benchmarks.bfloat16 [--steps=200] [--speed_steps=10] [--out=runs/benchmarks/bfloat16.json] [--smoke]

Three runs of gin/experiments/tiny_pretrain.gin for --steps steps, every step logged, no evaluation: float32, a
second float32 run with another seed (another initialisation and data order: the run-to-run noise), and bfloat16
compute (TeleFLMConfig.dtype; parameters and Adam stay float32) with the first run's seed. After a moving average
over --window steps, the bfloat16 gap |bf16 - f32| is set against the seed gap |f32(seed 1) - f32| over the second
half of training and at the last step: bfloat16 is within noise when its gap is no larger. The speed is the median
step time of float32 over that of bfloat16, on these runs and on the bench config (gin/experiments/bench_cpu.gin,
--speed_steps steps each). Every run is `python -m flm_jax.train` in its own process (benchmarks/train_step.py's
worker). Nothing else should run on the machine while it measures. --smoke runs the three tiny runs at a toy
shape for a few steps and leaves out the bench-config runs.
"""

from __future__ import annotations

import statistics

import numpy as np

from benchmarks import common
from benchmarks.train_step import DEFAULT_GIN as BENCH_GIN
from benchmarks.train_step import MODULE as TRAIN_WORKER
from flm_jax import cli

TINY_GIN = "gin/experiments/tiny_pretrain.gin"
LOGGED = [
    "--gin.TrainConfig.log_every=1",
    "--gin.TrainConfig.eval_tasks=()",
    "--gin.TrainConfig.checkpoint_every=100000",
]
BF16 = ['--gin.TeleFLMConfig.dtype="bfloat16"', '--gin.TeleFLMConfig.param_dtype="float32"']


def train_run(gin_file: str, steps: int, warmup: int, extra: list[str]) -> dict:
    args = ["--worker", "flm_jax", f"--steps={steps}", f"--warmup={warmup}", f"--gin_file={gin_file}", *LOGGED]
    return common.run_worker(TRAIN_WORKER, args + extra)


def smoothed(losses: list[float], window: int) -> np.ndarray:
    """The trailing moving average (shorter at the start)."""
    cumsum = np.cumsum(np.asarray(losses, np.float64))
    n = np.arange(1, len(losses) + 1)
    start = np.maximum(n - window, 0)
    return (cumsum - np.concatenate([[0.0], cumsum])[start]) / (n - start)


def gaps(reference: list[float], other: list[float], window: int) -> dict[str, float]:
    """|other - reference| after smoothing: the mean over the second half of training and at the last step."""
    gap = np.abs(smoothed(other, window) - smoothed(reference, window))
    return {"second_half_mean": float(gap[len(gap) // 2 :].mean()), "last": float(gap[-1])}


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="steps of each tiny pretraining run")
    p.add_argument("--window", type=int, default=20, help="moving-average window of the loss curves")
    p.add_argument("--speed_steps", type=int, default=10, help="steps of each bench-config run (3 not timed)")
    p.add_argument("--out", default="runs/benchmarks/bfloat16.json")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on a toy shape (the figures mean nothing)")
    args = cli.parse(p, argv, reads_data=False, load=False)
    shrink = [f"--gin.{b.replace(' = ', '=', 1)}" for b in common.SMOKE_BINDINGS] if args.smoke else []
    if args.smoke:
        args.steps, args.window, args.speed_steps = 6, 2, 4
        common.run_workers_in_process()
    warmup = 3 if args.speed_steps > 3 else 0
    if args.steps < 4 or args.speed_steps <= warmup:
        raise cli.ConfigError(f"--steps={args.steps} must be at least 4 and --speed_steps above {warmup}.")

    curves = {}
    for name, extra in (("float32", []), ("float32_seed1", ["--gin.TrainConfig.seed=1"]), ("bfloat16", BF16)):
        print(f"tiny pretraining, {name}, {args.steps} steps ...", flush=True)
        curves[name] = train_run(TINY_GIN, args.steps, warmup, extra + shrink)
    speed = {}
    for name, extra in (("float32", []), ("bfloat16", BF16)) if not args.smoke else ():  # smoke: tiny's speed only
        print(f"bench config, {name}, {args.speed_steps} steps ...", flush=True)
        speed[name] = train_run(BENCH_GIN, args.speed_steps, warmup, extra + shrink)

    f32, seed1, bf16 = (curves[k]["losses"] for k in ("float32", "float32_seed1", "bfloat16"))
    noise, bf16_gap = gaps(f32, seed1, args.window), gaps(f32, bf16, args.window)
    step_time = {
        run: {k: statistics.median(r["step_times_s"]) for k, r in runs.items()}
        for run, runs in (("tiny", curves), ("bench", speed))
        if runs
    }
    results = {
        "machine": common.machine(),
        "steps": args.steps,
        "window": args.window,
        "smoke": args.smoke,
        "seed_gap": noise,
        "bfloat16_gap": bf16_gap,
        "within_noise": bf16_gap["second_half_mean"] <= noise["second_half_mean"],
        "final_loss": {k: r["losses"][-1] for k, r in curves.items()},
        "step_time_s": step_time,
        "bfloat16_speedup": {run: t["float32"] / t["bfloat16"] for run, t in step_time.items()},
        "losses": {k: r["losses"] for k, r in curves.items()},
    }
    print("final loss: " + "  ".join(f"{k} {v:.4f}" for k, v in results["final_loss"].items()))
    for label, gap in (("seed gap (noise)", noise), ("bfloat16 gap", bf16_gap)):
        print(f"{label:17s} second half {gap['second_half_mean']:.4f}  last step {gap['last']:.4f}")
    print(f"bfloat16 within noise: {results['within_noise']}")
    for run, t in step_time.items():
        print(
            f"{run:5s} step: float32 {t['float32']:.3f} s, bfloat16 {t['bfloat16']:.3f} s, "
            f"bfloat16 speed-up {results['bfloat16_speedup'][run]:.2f}x"
        )
    common.write_results(args.out, results)


if __name__ == "__main__":
    cli.run_tool("bfloat16", main)
