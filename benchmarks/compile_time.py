"""Compile time of the train step against depth, with the scanned layer stack.

    python -m benchmarks.compile_time [--gin_file=gin/experiments/bench_cpu.gin] [--layers=4,16,64] [--rounds=1]
                                      [--out=F] [--smoke]

The step is `flm_jax.training.step.jit_train_step`, the function `flm_jax.train` jits (model, AdamW, clipping,
shardings, donation, the gin file's remat policy and microbatches), lowered with abstract inputs as
`flm_jax.aot` lowers it (StateSpec.abstract and aot.abstract_batch) on this host's mesh, then compiled by XLA for
this host. Each depth runs in a fresh process with the persistent compilation cache off, so no compile is
reused; lowering (tracing to StableHLO) and compiling (XLA) are timed separately, and the best of --rounds
(alternating depths) is kept. Each worker also counts the optimised HLO's instructions and while loops: a count
that grows with depth means something is unrolled per layer. Goal: compile(64) <= 1.5x compile(4).
"""

from __future__ import annotations

import argparse
import re
import time

from benchmarks import common
from flm_jax import cli

MODULE = "benchmarks.compile_time"
DEFAULT_GIN = "gin/experiments/bench_cpu.gin"
DEFAULT_LAYERS = "4,16,64"
SMOKE_LAYERS = "2,4"
GOAL = 1.5
# The measured stack is scanned one layer per iteration whatever the gin file unrolls (bench_cpu.gin unrolls 8).
SCANNED = "TeleFLMConfig.scan_unroll = 1"
# The persistent cache would let a later process reuse an earlier one's executable.
WORKER_ENV = {"JAX_ENABLE_COMPILATION_CACHE": "false"}
HLO_INSTRUCTION = re.compile(r"^\s*(ROOT )?%?[\w.\-]+ = ", re.MULTILINE)


def hlo_counts(hlo_text: str) -> dict[str, int]:
    """Instructions and while loops of an optimised HLO module's text."""
    return {
        "hlo_instructions": len(HLO_INSTRUCTION.findall(hlo_text)),
        "hlo_while_loops": len(re.findall(r"\bwhile\(", hlo_text)),
    }


def worker(gin_files: list[str], bindings: list[str]) -> None:
    import jax

    from flm_jax import aot
    from flm_jax.config import TeleFLMConfig
    from flm_jax.optim import OptimizerConfig
    from flm_jax.partitioning import MeshLayout, batch_sharding, make_mesh
    from flm_jax.training.config import TrainConfig
    from flm_jax.training.state import StateSpec
    from flm_jax.training.step import jit_train_step

    cli.load_gin(gin_files, bindings, reads_data=False)
    model_cfg, layout = cli.configured(TeleFLMConfig), cli.configured(MeshLayout)
    optimizer_cfg, train_cfg = cli.configured(OptimizerConfig), cli.configured(TrainConfig)
    started = time.perf_counter()
    mesh = make_mesh(layout)
    spec = StateSpec.build(model_cfg, optimizer_cfg, mesh, layout, train_cfg.steps)
    step = jit_train_step(model_cfg, spec, layout, mesh, train_cfg.num_microbatches, train_cfg.z_loss)
    batch = aot.abstract_batch(train_cfg.batch_size, train_cfg.seq_len, batch_sharding(mesh, layout))
    built = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step.lower(spec.abstract, batch)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
    common.emit(
        {
            "layers": model_cfg.num_hidden_layers,
            "params": model_cfg.params_total(),
            "state_leaves": len(jax.tree_util.tree_leaves(spec.abstract)),
            "build_s": built - started,
            "lower_s": lowered_at - built,
            "compile_s": compiled_at - lowered_at,
            "stablehlo_lines": lowered.as_text().count("\n"),
            **hlo_counts(compiled.as_text()),
            "persistent_cache": jax.config.jax_enable_compilation_cache,
            "remat_policy": model_cfg.remat_policy,
        }
    )


def best_per_depth(runs: list[dict]) -> dict[int, dict]:
    """Per depth, the fastest round's figures (lower and compile each at its minimum over rounds)."""
    best: dict[int, dict] = {}
    for r in runs:
        b = best.setdefault(r["layers"], dict(r))
        for key in ("build_s", "lower_s", "compile_s"):
            b[key] = min(b[key], r[key])
    return best


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--layers", default=None, help=f"comma-separated depths (default {DEFAULT_LAYERS})")
    p.add_argument("--rounds", type=int, default=1, help="compile every depth this many times, alternating")
    p.add_argument("--out", default="runs/benchmarks/compile_time.json")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on a toy shape (the figures mean nothing)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = cli.parse(p, argv, reads_data=False, load=False)
    gin_files = args.gin_file or [DEFAULT_GIN]
    bindings = [SCANNED, *(common.SMOKE_BINDINGS if args.smoke else []), *args.gin_bindings]
    if args.worker:
        return worker(gin_files, bindings)
    layers = [int(n) for n in (args.layers or (SMOKE_LAYERS if args.smoke else DEFAULT_LAYERS)).split(",")]

    worker_args = [*(f"--gin_file={f}" for f in gin_files), *(f"--gin.{b.replace(' = ', '=', 1)}" for b in bindings)]
    runs = []
    for round_ in range(args.rounds):
        for depth in layers:
            print(f"[round {round_ + 1}/{args.rounds}] {depth} layers ...", flush=True)
            depth_arg = f"--gin.TeleFLMConfig.num_hidden_layers={depth}"
            runs.append(common.run_worker(MODULE, ["--worker", *worker_args, depth_arg], env=WORKER_ENV))
    best = best_per_depth(runs)
    first, last = best[layers[0]], best[layers[-1]]
    ratios = {key: last[key] / first[key] for key in ("lower_s", "compile_s")}
    results = {
        "machine": common.machine(),
        "gin_files": gin_files,
        "bindings": bindings,
        "smoke": args.smoke,
        "rounds": args.rounds,
        "depths": {str(d): best[d] for d in layers},
        f"compile_ratio_{layers[-1]}_over_{layers[0]}": ratios["compile_s"],
        f"lower_ratio_{layers[-1]}_over_{layers[0]}": ratios["lower_s"],
        "runs": runs,
    }
    print(f"{'layers':>6s} {'params':>10s} {'lower s':>8s} {'compile s':>9s} {'HLO instrs':>10s} {'while':>5s}")
    for d in layers:
        b = best[d]
        print(
            f"{d:6d} {b['params'] / 1e6:9.1f}M {b['lower_s']:8.2f} {b['compile_s']:9.2f} "
            f"{b['hlo_instructions']:10d} {b['hlo_while_loops']:5d}"
        )
    print(
        f"compile({layers[-1]}) / compile({layers[0]}): {ratios['compile_s']:.2f}x (goal <= {GOAL}x); "
        f"lower: {ratios['lower_s']:.2f}x"
    )
    common.write_results(args.out, results)


if __name__ == "__main__":
    cli.run_tool("compile_time", main)
