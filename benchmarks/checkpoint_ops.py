"""Growth and export of a checkpoint against a plain restore + save of it, and each one's peak RSS against the
checkpoint's size on disk, at two model sizes.

    python -m benchmarks.checkpoint_ops [--gin_file=gin/growth/tiny_52b_to_102b.gin] [--sizes=small,200m]
                                        [--workdir=DIR] [--out=F] [--smoke]

Per size, the checkpoint of one step of `python -m flm_jax.train` (gin/experiments/bench_cpu.gin's μP model and
AdamW at that size, a tiny batch; params and Adam state, whose moments are then dense as in any trained run, where a
fresh state's zeros would compress to nothing) is put through, each in a fresh process:
  restore_save  flm_jax.training.checkpoint.Checkpointer restores the whole train state onto its StateSpec, as a
                resumed run does, and saves it into another workdir, as train checkpoints (waiting for the write)
  grow          `python -m flm_jax.grow` with the --gin_file recipe (the shipped one by default), its sizes set to
                the paper's 52B -> 102B ratios: hidden (heads at a fixed head_dim), FFN and layers x1.25
  export        `python -m flm_jax.export --format=llama --dtype=float32`, tokenizer included
Each tool's main runs inside the worker, timed from its call to its return, so the module imports are not counted
(flm_jax.grow's include TensorFlow, for its probe batch). Peak RSS is the worker's own VmHWM, imports included
(flm_jax.hf.export.peak_rss_mib); `imports_rss_mib` is the same before the timed call. Goals: grow and export <= 1.5x
restore_save, export peak RSS <= 0.3x the checkpoint's size on disk at ~200M parameters. Everything is written into
a temporary folder (inside --workdir if given), deleted after each size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import tempfile
import time
from pathlib import Path

from benchmarks import common
from experiments import export_benchmark
from flm_jax import cli

MODULE = "benchmarks.checkpoint_ops"
TRAIN_GIN = "gin/experiments/bench_cpu.gin"
TRAIN_BINDINGS = ["TrainConfig.steps = 1", "TrainConfig.batch_size = 1", "TrainConfig.seq_len = 64"]
MESH_GIN = "gin/meshes/single.gin"
DEFAULT_GROWTH_GIN = "gin/growth/tiny_52b_to_102b.gin"
HEAD_DIM = 64
# hidden, FFN, layers: 28M and 210M parameters.
SIZES = {"small": (512, 1408, 8), "200m": (1024, 2816, 16)}
# --smoke: a seconds-long run of the whole script (tests/test_benchmarks.py), figures meaningless.
SMOKE_SIZES = {"tiny": (64, 128, 1)}
GROWTH = 1.25  # Tele-FLM's 52B -> 102B ratio
GOAL_TIME, GOAL_EXPORT_RSS = 1.5, 0.3
OPS = ("restore_save", "grow", "export")


def model_bindings(hidden: int, ffn: int, layers: int) -> list[str]:
    heads = hidden // HEAD_DIM
    return [
        f"TeleFLMConfig.hidden_size = {hidden}",
        f"TeleFLMConfig.intermediate_size = {ffn}",
        f"TeleFLMConfig.num_hidden_layers = {layers}",
        f"TeleFLMConfig.num_attention_heads = {heads}",
        f"TeleFLMConfig.num_key_value_heads = {heads}",
    ]


def growth_bindings(hidden: int, ffn: int, layers: int) -> list[str]:
    """The growth to GROWTH x the source in every dimension, rounded up, head_dim fixed; any source shape."""
    heads = math.ceil(hidden // HEAD_DIM * GROWTH)
    return [
        f"GrowthSpec.hidden_size = {heads * HEAD_DIM}",
        f"GrowthSpec.num_attention_heads = {heads}",
        f"GrowthSpec.intermediate_size = {math.ceil(ffn * GROWTH)}",
        f"GrowthSpec.num_hidden_layers = {math.ceil(layers * GROWTH)}",
        "GrowthSpec.expect_source = None",
    ]


def flags(bindings: list[str]) -> list[str]:
    return [f"--gin.{b.replace(' = ', '=', 1)}" for b in bindings]


def timed(fn, *args) -> dict:
    """fn(*args)'s seconds and this process's peak RSS before and after, with the figures fn returns (if any)."""
    from flm_jax.hf.export import peak_rss_mib

    imports = peak_rss_mib()
    started = time.perf_counter()
    own = fn(*args) or {}
    seconds = time.perf_counter() - started
    return {**own, "seconds": seconds, "peak_rss_mib": peak_rss_mib(), "imports_rss_mib": imports}


def write_worker(workdir: str, bindings: list[str]) -> None:
    from flm_jax import train
    from flm_jax.training.checkpoint_reader import CheckpointReader

    result = timed(train.main, [f"--gin_file={TRAIN_GIN}", *flags(TRAIN_BINDINGS + bindings), f"--workdir={workdir}"])
    common.emit({**result, "params": CheckpointReader(workdir).config.params_total()})


def restore_save(src: str, dst: str) -> dict:
    """The train state restored from src's latest checkpoint and saved into dst; the seconds of each half."""
    import jax

    from flm_jax.optim import OptimizerConfig
    from flm_jax.partitioning import MeshLayout, make_mesh
    from flm_jax.training.checkpoint import Checkpointer
    from flm_jax.training.checkpoint_reader import CheckpointReader
    from flm_jax.training.state import StateSpec

    started = time.perf_counter()
    reader = CheckpointReader(src)
    layout = cli.configured(MeshLayout)
    spec = StateSpec.build(reader.config, OptimizerConfig(), make_mesh(layout), layout, reader.step + 1)
    source = Checkpointer(src)
    state, data_state, metadata = source.restore(reader.step, spec.abstract)
    jax.block_until_ready(state)
    source.close()
    restored = time.perf_counter()
    out = Checkpointer(dst, async_save=False)
    out.save(reader.step, state, data_state, metadata, force=True)
    out.close()
    return {"restore_s": restored - started, "save_s": time.perf_counter() - restored}


def restore_save_worker(src: str, dst: str) -> None:
    cli.load_gin([MESH_GIN], [], reads_data=False)
    common.emit(timed(restore_save, src, dst))


def grow_worker(src: str, dst: str, gin_files: list[str], bindings: list[str]) -> None:
    from flm_jax import grow

    argv = [*(f"--gin_file={f}" for f in [MESH_GIN, *gin_files]), *flags(bindings)]
    result = timed(grow.main, [*argv, f"--from_workdir={src}", f"--workdir={dst}"])
    report = json.loads((Path(dst) / "growth.json").read_text())
    kept = ("phase_seconds", "wall_seconds", "target_params", "max_abs_dlogit")
    common.emit({**result, **{k: report[k] for k in kept}})


def export_worker(src: str, dst: str) -> None:
    from flm_jax import export

    log = io.StringIO()  # export prints its peak RSS once the weights are written, before the tokenizer
    with contextlib.redirect_stdout(log):
        result = timed(export.main, [f"--workdir={src}", f"--out={dst}", "--format=llama", "--dtype=float32"])
    print(log.getvalue(), end="")
    weights_rss = export_benchmark.peak_from(log.getvalue(), r"head written .* peak RSS +([0-9.]+) MiB")
    common.emit({**result, "peak_rss_before_tokenizer_mib": weights_rss})


def measure_size(shape: tuple[int, int, int], gin_files: list[str], bindings: list[str], workdir: str | None) -> dict:
    """Write the checkpoint of `shape`, run every operation on it in its own process, and delete it all."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="checkpoint_ops_") as tmp:
        src = f"{tmp}/src"
        written = common.run_worker(MODULE, ["--worker=write", f"--src={src}", *flags(model_bindings(*shape))])
        checkpoint_mib = export_benchmark.dir_bytes(Path(src) / "checkpoints") / 2**20
        growth = [*(f"--gin_file={f}" for f in gin_files), *flags(growth_bindings(*shape) + bindings)]
        ops = {}
        for op in OPS:
            print(f"  {op} ...", flush=True)
            args = [f"--worker={op}", f"--src={src}", f"--dst={tmp}/{op}", *(growth if op == "grow" else [])]
            ops[op] = common.run_worker(MODULE, args)
            ops[op]["rss_over_checkpoint"] = ops[op]["peak_rss_mib"] / checkpoint_mib
    base = ops["restore_save"]["seconds"]
    ratios = {f"{op}_over_restore_save": ops[op]["seconds"] / base for op in OPS[1:]}
    return {
        "shape": dict(zip(("hidden_size", "intermediate_size", "num_hidden_layers"), shape)),
        "params": written["params"],
        "checkpoint_write_s": written["seconds"],
        "checkpoint_mib": checkpoint_mib,
        "ops": ops,
        **ratios,
    }


def print_table(sizes: dict[str, dict]) -> None:
    header = ("size", "params", "ckpt MiB", "op", "seconds", "x r+s", "peak MiB", "x ckpt")
    print("{:6s} {:>8s} {:>9s} {:12s} {:>8s} {:>6s} {:>9s} {:>7s}".format(*header))
    for name, s in sizes.items():
        for op, o in s["ops"].items():
            ratio = o["seconds"] / s["ops"]["restore_save"]["seconds"]
            print(
                f"{name:6s} {s['params'] / 1e6:7.1f}M {s['checkpoint_mib']:9.0f} {op:12s} {o['seconds']:8.2f} "
                f"{ratio:6.2f} {o['peak_rss_mib']:9.0f} {o['rss_over_checkpoint']:7.2f}"
            )
    for name, s in sizes.items():
        export = s["ops"]["export"]
        print(
            f"{name}: grow / restore+save {s['grow_over_restore_save']:.2f}x, export / restore+save "
            f"{s['export_over_restore_save']:.2f}x (goal <= {GOAL_TIME}x); export peak RSS "
            f"{export['rss_over_checkpoint']:.2f}x the checkpoint (goal <= {GOAL_EXPORT_RSS}x at ~200M; "
            f"{export['peak_rss_before_tokenizer_mib'] / s['checkpoint_mib']:.2f}x before the tokenizer, "
            f"imports alone {export['imports_rss_mib'] / s['checkpoint_mib']:.2f}x)"
        )
        phases = ", ".join(f"{phase} {sec:.2f} s" for phase, sec in s["ops"]["grow"]["phase_seconds"].items())
        print(f"{name}: grow's phases: {phases}")


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--sizes", default=None, help=f"comma-separated, of {sorted(SIZES)} (default: both)")
    p.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: the system's)")
    p.add_argument("--out", default="runs/benchmarks/checkpoint_ops.json")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on toy sizes (the figures mean nothing)")
    p.add_argument("--worker", choices=["write", *OPS], default=None, help=argparse.SUPPRESS)
    p.add_argument("--src", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dst", default=None, help=argparse.SUPPRESS)
    args = cli.parse(p, argv, reads_data=False, load=False)
    if args.worker == "write":
        return write_worker(args.src, args.gin_bindings)
    if args.worker == "restore_save":
        return restore_save_worker(args.src, args.dst)
    if args.worker == "grow":
        return grow_worker(args.src, args.dst, args.gin_file, args.gin_bindings)
    if args.worker == "export":
        return export_worker(args.src, args.dst)

    table = SMOKE_SIZES if args.smoke else SIZES
    if args.smoke:
        common.run_workers_in_process()
    names = args.sizes.split(",") if args.sizes else list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise cli.ConfigError(f"--sizes: unknown {unknown}; choose from {sorted(table)}.")
    gin_files = args.gin_file or [DEFAULT_GROWTH_GIN]
    sizes = {}
    for name in names:
        print(f"[{name}] writing the checkpoint ...", flush=True)
        sizes[name] = measure_size(table[name], gin_files, args.gin_bindings, args.workdir)
    results = {"machine": common.machine(), "smoke": args.smoke, "growth_gin": gin_files, "sizes": sizes}
    print_table(sizes)
    common.write_results(args.out, results)


if __name__ == "__main__":
    cli.run_tool("checkpoint_ops", main)
