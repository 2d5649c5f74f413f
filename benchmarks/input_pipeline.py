"""Input pipeline throughput against what the bench step consumes, and the start-up time of the command-line tools.

    python -m benchmarks.input_pipeline [--gin_file=gin/experiments/bench_cpu.gin] [--batches=50]
                                        [--step_time_s=S] [--tools=plan,train,export] [--out=F] [--smoke]

Pipelines, each in a fresh process:
  seqio  the training stream exactly as `flm_jax.train` builds it (training.input.train_input on the gin file's
         TrainConfig: the embedded corpus's flm_default mixture through seqio, packed; batch 8 x 512 on
         bench_cpu.gin). Its first batch is timed apart (the tf.data graph built, the shuffle buffer filled), then
         --batches more are drained; tokens/s counts every batch x seq_len slot, as the step consumes them (the
         share that is not padding is reported too).
  sft    the same with TrainConfig.mixture = flm_instructions (the shipped chat set, packed by
         chat.ChatFeatureConverter), at the same batch x seq_len, so both compare with the same consumption.
Consumption is the bench config's tokens per step / its step time: --step_time_s, else flm_jax's step_time_s in
runs/benchmarks/train_step.json (python -m benchmarks.train_step; ignored under --smoke), else the second step of
the train start-up run below (one step, so noisier). Goal: each pipeline >= 10x. The pipelines run alone on idle
cores here; in training they share the cores with the step.

Start-up, each tool in a fresh `python -X importtime` process timed from its spawn:
  plan    the 52B model on the v5p-512 layout, to its exit (no devices, no TensorFlow)
  train   the gin file's config for 2 steps in a temporary workdir, to the stdout line of its first logged step
          (also: to its step-0 line, the end of set-up; the first and second step_time_s of metrics.jsonl, whose
          difference is mostly compilation)
  export  train's checkpoint to a llama folder in float32, to its exit
The import-time log is summed by top-level package (each module's own time), so each tool's time splits into
imports (the top packages listed) and its own work. Every stderr line of a tool that mentions CUDA, cuInit or a
TPU is kept in the results (issue 14: a CPU host's console should show none).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from flm_jax import cli

MODULE = "benchmarks.input_pipeline"
DEFAULT_GIN = "gin/experiments/bench_cpu.gin"
TRAIN_STEP_JSON = "runs/benchmarks/train_step.json"
SFT_MIXTURE = "flm_instructions"
PLAN_ARGS = ["--gin_file=gin/models/52b.gin", "--gin_file=gin/meshes/tpu_v5p_52b.gin"]
TOOLS = ("plan", "train", "export")
GOAL = 10.0
TOP_PACKAGES = 5
SMOKE_BATCHES = 3
# The shipped chat records need the bench config's length (shorter rows would refuse them, never truncate them).
SMOKE_BINDINGS = [*common.SMOKE_BINDINGS, "TrainConfig.seq_len = 512"]
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+\d+ \|\s*([\w.]+)")
PROBE_LINE = re.compile(r"cuda|cuinit|tpu", re.IGNORECASE)
STEP_LINE = r"^\[\s*{}/\d+\]"


def flags(bindings: list[str]) -> list[str]:
    return [f"--gin.{b.replace(' = ', '=', 1)}" for b in bindings]


def pipeline_worker(gin_files: list[str], bindings: list[str], batches: int) -> None:
    from flm_jax import data
    from flm_jax.partitioning import MeshLayout, batch_sharding, make_mesh
    from flm_jax.training.config import TrainConfig
    from flm_jax.training.input import train_input

    cli.load_gin(gin_files, bindings)
    data.register_tasks()
    train_cfg, layout = cli.configured(TrainConfig), cli.configured(MeshLayout)
    mesh = make_mesh(layout)
    started = time.perf_counter()
    stream = train_input(train_cfg, batch_sharding(mesh, layout), {}, lambda shards: {}, 0).stream
    next(stream)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    real = 0
    for _ in range(batches):
        real += int((next(stream)["segment_ids"] > 0).sum())
    seconds = time.perf_counter() - started
    slots = batches * train_cfg.batch_size * train_cfg.seq_len
    common.emit(
        {
            "mixture": train_cfg.mixture,
            "batch_size": train_cfg.batch_size,
            "seq_len": train_cfg.seq_len,
            "first_batch_s": first_s,
            "batches": batches,
            "seconds": seconds,
            "tokens_per_sec": slots / seconds,
            "non_padding": real / slots,
        }
    )


def import_summary(lines: list[str]) -> dict:
    """Seconds of all imports and of the TOP_PACKAGES slowest top-level packages (each module's own time)."""
    by_package: collections.Counter = collections.Counter()
    for line in lines:
        match = IMPORT_LINE.match(line)
        if match:
            by_package[match.group(2).split(".")[0]] += int(match.group(1)) / 1e6
    return {
        "imports_s": sum(by_package.values()),
        "top_imports_s": dict(by_package.most_common(TOP_PACKAGES)),
    }


def time_tool(module: str, args: list[str], marks: dict[str, str] | None = None) -> dict:
    """`python -X importtime -m module args` from the repository root: seconds from spawn to exit and to the first
    stdout line matching each of `marks`, its imports summed, and its stderr lines that mention CUDA or a TPU."""
    cmd = [sys.executable, "-X", "importtime", "-m", module, *args]
    marks = marks or {}
    seen = {}
    with tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=common.REPO_ROOT, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        for line in proc.stdout:
            for name, pattern in marks.items():
                if name not in seen and re.search(pattern, line):
                    seen[name] = time.perf_counter() - started
        code = proc.wait()
        exit_s = time.perf_counter() - started
        err.seek(0)
        lines = err.read().splitlines()
    console = [line for line in lines if not IMPORT_LINE.match(line)]
    if code != 0 or set(marks) - set(seen):
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}):\n" + "\n".join(console[-20:]))
    return {
        "exit_s": exit_s,
        **{f"{name}_s": s for name, s in seen.items()},
        **import_summary(lines),
        "probe_lines": [line for line in console if PROBE_LINE.search(line)],
    }


def measure_tools(names: list[str], gin_files: list[str], bindings: list[str], tmp: str) -> dict:
    """Each tool's start-up; train's run leaves the checkpoint that export reads."""
    tools = {}
    train_workdir = f"{tmp}/train"
    for name in names:
        print(f"  {name} ...", flush=True)
        if name == "plan":
            tools[name] = time_tool("flm_jax.plan", PLAN_ARGS)
        elif name == "train":
            args = [*(f"--gin_file={f}" for f in gin_files), *flags(bindings), "--gin.TrainConfig.steps=2"]
            marks = {"setup": STEP_LINE.format(0), "first_step": STEP_LINE.format(1)}
            tools[name] = time_tool("flm_jax.train", [*args, f"--workdir={train_workdir}"], marks)
            records = [json.loads(line) for line in open(f"{train_workdir}/metrics.jsonl")]
            tools[name]["step_times_s"] = [r["step_time_s"] for r in records]
        else:
            if not Path(train_workdir).exists():
                raise cli.ConfigError("--tools: export reads train's checkpoint; list train before export.")
            args = [f"--workdir={train_workdir}", f"--out={tmp}/hf", "--format=llama", "--dtype=float32"]
            tools[name] = time_tool("flm_jax.export", args)
    for t in tools.values():
        t["startup_s"] = t.get("first_step_s", t["exit_s"])
        t["own_work_s"] = t["startup_s"] - t["imports_s"]
    return tools


def consumption(args, tools: dict, tokens_per_step: int) -> dict:
    """The bench step's tokens/s and where its step time came from."""
    if args.step_time_s:
        return {"step_time_s": args.step_time_s, "source": "--step_time_s", "tokens_per_step": tokens_per_step}
    saved = Path(common.REPO_ROOT, TRAIN_STEP_JSON)
    if saved.exists() and not args.smoke:
        r = json.loads(saved.read_text())
        if r.get("smoke"):
            raise cli.ConfigError(
                f"{TRAIN_STEP_JSON} holds a --smoke run; run python -m benchmarks.train_step, or pass --step_time_s."
            )
        step_time = r["sides"]["flm_jax"]["step_time_s"]
        return {
            "step_time_s": step_time,
            "source": TRAIN_STEP_JSON,
            "tokens_per_step": r["shape"]["batch_size"] * r["shape"]["seq_len"],
        }
    if "train" not in tools:
        raise cli.ConfigError("no step time: pass --step_time_s, run benchmarks.train_step, or add train to --tools.")
    step_time = tools["train"]["step_times_s"][1]
    return {
        "step_time_s": step_time,
        "source": "the train start-up run's second step",
        "tokens_per_step": tokens_per_step,
    }


def print_table(pipelines: dict, consumed: dict, tools: dict) -> None:
    rate = consumed["tokens_per_step"] / consumed["step_time_s"]
    print(
        f"bench step consumes {rate:.0f} tokens/s ({consumed['tokens_per_step']} tokens / "
        f"{consumed['step_time_s']:.3f} s, from {consumed['source']})"
    )
    print(
        "{:6s} {:18s} {:>10s} {:>10s} {:>8s} {:>9s}".format("pipe", "mixture", "first s", "tokens/s", "real", "x step")
    )
    for name, p in pipelines.items():
        print(
            f"{name:6s} {p['mixture']:18s} {p['first_batch_s']:10.2f} {p['tokens_per_sec']:10.0f} "
            f"{p['non_padding']:8.1%} {p['over_consumption']:8.1f}x (goal >= {GOAL:.0f}x)"
        )
    print("{:7s} {:>9s} {:>9s} {:>9s}  {}".format("tool", "start-up", "imports", "own", "slowest imports (s)"))
    for name, t in tools.items():
        top = ", ".join(f"{k} {v:.2f}" for k, v in t["top_imports_s"].items())
        print(f"{name:7s} {t['startup_s']:9.2f} {t['imports_s']:9.2f} {t['own_work_s']:9.2f}  {top}")
    if "train" in tools:
        t = tools["train"]
        first, second = t["step_times_s"][:2]
        print(
            f"train: set-up done (step-0 line) at {t['setup_s']:.2f} s, first step logged at {t['first_step_s']:.2f} s;"
            f" step 1 took {first:.2f} s, step 2 {second:.2f} s (compile + first batch ~ {first - second:.2f} s)"
        )
    for name, t in tools.items():
        for line in t["probe_lines"]:
            print(f"{name} console: {line[:160]}")


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=50, help="batches drained after the first, per pipeline")
    p.add_argument(
        "--step_time_s", type=float, default=None, help=f"the bench step's time (default: {TRAIN_STEP_JSON})"
    )
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, of plan, train, export ('' for none)")
    p.add_argument("--workdir", default=None, help="where the temporary runs go (default: the system's)")
    p.add_argument("--out", default="runs/benchmarks/input_pipeline.json")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on toy shapes (the figures mean nothing)")
    p.add_argument("--worker", choices=["pipeline"], default=None, help=argparse.SUPPRESS)
    args = cli.parse(p, argv, reads_data=False, load=False)
    gin_files = args.gin_file or [DEFAULT_GIN]
    bindings = (SMOKE_BINDINGS if args.smoke else []) + args.gin_bindings
    if args.smoke:
        args.batches = SMOKE_BATCHES
    if args.worker == "pipeline":
        return pipeline_worker(gin_files, bindings, args.batches)
    if args.smoke:
        common.run_workers_in_process()

    from flm_jax.training.config import TrainConfig

    cli.load_gin(gin_files, bindings, reads_data=False)
    train_cfg = cli.configured(TrainConfig)
    names = [n for n in args.tools.split(",") if n]
    if set(names) - set(TOOLS):
        raise cli.ConfigError(f"--tools={args.tools!r}: choose from {', '.join(TOOLS)}.")
    pipelines = {}
    for name, extra in (("seqio", []), ("sft", [f"TrainConfig.mixture = '{SFT_MIXTURE}'"])):
        print(f"[pipeline] {name} ...", flush=True)
        worker_args = [*(f"--gin_file={f}" for f in gin_files), *flags(bindings + extra), f"--batches={args.batches}"]
        pipelines[name] = common.run_worker(MODULE, ["--worker=pipeline", *worker_args])
    print("[start-up]", flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="input_pipeline_") as tmp:
        tools = measure_tools(names, gin_files, bindings, tmp)
    consumed = consumption(args, tools, train_cfg.batch_size * train_cfg.seq_len)
    rate = consumed["tokens_per_step"] / consumed["step_time_s"]
    for pipeline in pipelines.values():
        pipeline["over_consumption"] = pipeline["tokens_per_sec"] / rate
    results = {
        "machine": common.machine(),
        "smoke": args.smoke,
        "gin_files": gin_files,
        "consumption": {**consumed, "tokens_per_sec": rate},
        "pipelines": pipelines,
        "tools": tools,
    }
    print_table(pipelines, consumed, tools)
    common.write_results(args.out, results)


if __name__ == "__main__":
    cli.run_tool("input_pipeline", main)
