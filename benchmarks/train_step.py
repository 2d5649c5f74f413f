"""flm_jax's training step against a Hugging Face transformers LlamaForCausalLM step, side by side in one run.

    python -m benchmarks.train_step [--gin_file=gin/experiments/bench_cpu.gin] [--steps=20] [--out=F] [--smoke]

flm_jax runs as a user runs it, `python -m flm_jax.train` on the gin file (the embedded corpus through the seqio
pipeline, every step logged), and its tokens/s is the median of the logged step_time_s after the warm-up steps.
PyTorch trains LlamaForCausalLM of the same shape (untied head, SDPA attention) with torch AdamW and gradient
clipping at 1.0 on random tokens, on as many threads as JAX uses (every core), its step timed to loss.item().
Each side also measures a float32 2048^3 matmul, and MFU divides the model FLOPs (6N + attention, the same formula
for both) by the faster of the two matmul rates. Each side runs in its own process; --rounds alternates them.
--profile traces flm_jax's steps 5-8 with jax.profiler into WORKDIR/tensorboard (--workdir keeps the run; open
the trace in TensorBoard's profile tab or Perfetto).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from benchmarks import common
from flm_jax import cli
from flm_jax.config import TeleFLMConfig
from flm_jax.training.config import TrainConfig

MODULE = "benchmarks.train_step"
DEFAULT_GIN = "gin/experiments/bench_cpu.gin"


def flm_jax_worker(jax_args: list[str], dtype: str, steps: int, warmup: int, profile: bool, keep_workdir: str | None):
    from flm_jax import train

    with tempfile.TemporaryDirectory() as tmp:
        workdir = keep_workdir or tmp
        argv = [*jax_args, f"--workdir={workdir}", f"--gin.TrainConfig.steps={steps}"]
        if profile:
            argv.append(f"--gin.TrainConfig.profile_steps=({min(5, steps - 1)}, {min(8, steps)})")
        started = time.perf_counter()
        train.main(argv)
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    times = [r["step_time_s"] for r in records if r["step"] > warmup]
    common.emit(
        {
            "step_times_s": times,
            "losses": [r["loss"] for r in records],
            "loss_first": records[0]["loss"],
            "loss_last": records[-1]["loss"],
            "wall_s": wall,
            "matmul_flops": common.jax_matmul_peak(dtype=dtype),
        }
    )


def torch_worker(shape: dict, steps: int, warmup: int, threads: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=shape["seq_len"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tokens = torch.randint(3, shape["vocab_size"], (shape["batch_size"], shape["seq_len"]))
    times, losses = [], []
    for _ in range(steps):
        started = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - started)
    common.emit(
        {
            "step_times_s": times[warmup:],
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "matmul_flops": common.torch_matmul_peak(),
            "threads": torch.get_num_threads(),
        }
    )


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="training steps per side (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="run each side this many times, alternating")
    p.add_argument("--sides", default="flm_jax,torch", help="which to run (flm_jax alone on a GPU host: README.md)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's threads (JAX uses every core)")
    p.add_argument("--workdir", default=None, help="flm_jax's run folder, kept (default: a temporary one)")
    p.add_argument("--profile", action="store_true", help="trace flm_jax steps 5-8 into WORKDIR/tensorboard")
    p.add_argument("--out", default="runs/benchmarks/train_step.json")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on a toy shape (the figures mean nothing)")
    p.add_argument("--worker", choices=["flm_jax", "torch"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = cli.parse(p, argv, reads_data=False, load=False)
    gin_files = args.gin_file or [DEFAULT_GIN]
    bindings = (common.SMOKE_BINDINGS if args.smoke else []) + args.gin_bindings
    if args.smoke:
        args.steps, args.warmup = 3, 1
    jax_args = [*(f"--gin_file={f}" for f in gin_files), *(f"--gin.{b.replace(' = ', '=', 1)}" for b in bindings)]
    if args.worker == "flm_jax":
        dtype = json.loads(args.shape)["dtype"] if args.shape else "float32"  # of the matmul peak
        return flm_jax_worker(jax_args, dtype, args.steps, args.warmup, args.profile, args.workdir)
    if args.worker == "torch":
        return torch_worker(json.loads(args.shape), args.steps, args.warmup, args.threads)
    if args.smoke:
        common.run_workers_in_process()

    cli.load_gin(gin_files, bindings, reads_data=False)
    model_cfg, train_cfg = cli.configured(TeleFLMConfig), cli.configured(TrainConfig)
    if args.steps <= args.warmup:
        raise cli.ConfigError(f"--steps={args.steps} must exceed --warmup={args.warmup}.")
    shape = {
        **{k: getattr(model_cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size")},
        **{k: getattr(model_cfg, k) for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads")},
        "batch_size": train_cfg.batch_size,
        "seq_len": train_cfg.seq_len,
        "dtype": model_cfg.dtype,
    }
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    flops_per_step = model_cfg.flops_per_token(train_cfg.seq_len) * tokens_per_step
    common_args = [f"--steps={args.steps}", f"--warmup={args.warmup}"]
    if args.workdir:
        jax_args.append(f"--workdir={os.path.abspath(args.workdir)}")
    if args.profile:
        jax_args.append("--profile")
    sides: dict[str, list[dict]] = {side: [] for side in args.sides.split(",")}
    if not sides or set(sides) - {"flm_jax", "torch"}:
        raise cli.ConfigError(f"--sides={args.sides!r}: choose flm_jax, torch or both (comma-separated).")
    for round_ in range(args.rounds):
        for side in sides:
            print(f"[round {round_ + 1}/{args.rounds}] {side} ...", flush=True)
            extra = [
                f"--shape={json.dumps(shape)}",
                *(jax_args if side == "flm_jax" else [f"--threads={args.threads}"]),
            ]
            sides[side].append(common.run_worker(MODULE, ["--worker", side, *common_args, *extra]))
    peak = max(r["matmul_flops"] for runs in sides.values() for r in runs)
    summary = {}
    for side, runs in sides.items():
        step_time = statistics.median(t for r in runs for t in r["step_times_s"])
        summary[side] = {
            "step_time_s": step_time,
            "tokens_per_sec": tokens_per_step / step_time,
            "mfu": flops_per_step / step_time / peak,
            "matmul_flops": max(r["matmul_flops"] for r in runs),
            "loss_first": runs[0]["loss_first"],
            "loss_last": runs[0]["loss_last"],
        }
    ratio = summary["flm_jax"]["tokens_per_sec"] / summary["torch"]["tokens_per_sec"] if len(sides) == 2 else None
    results = {
        "machine": common.machine(),
        "shape": shape,
        "params": model_cfg.params_total(),
        "flops_per_step": flops_per_step,
        "peak_matmul_flops": peak,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "smoke": args.smoke,
        "torch_threads": args.threads,
        "sides": summary,
        "flm_jax_over_torch": ratio,
        "runs": sides,
    }
    print(f"float32 matmul peak measured: {peak / 1e9:.1f} GFLOP/s")
    for side, s in summary.items():
        print(
            f"{side:8s} {s['step_time_s']:7.3f} s/step  {s['tokens_per_sec']:8.0f} tokens/s  MFU {s['mfu']:6.1%}  "
            f"loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}"
        )
    if ratio is not None:
        mfu = summary["flm_jax"]["mfu"]
        print(f"flm_jax / PyTorch tokens/s: {ratio:.2f}x (goal 1.5x); flm_jax MFU {mfu:.1%} (goal 60%)")
    common.write_results(args.out, results)


if __name__ == "__main__":
    cli.run_tool("train_step", main)
