"""Plan a model on a mesh: parameter count and per-device memory estimated without devices (flm_jax.planning),
and with --compile the real train step compiled ahead of time for a TPU slice on this host (flm_jax.aot).

python -m flm_jax.plan --gin_file=gin/models/1t.gin --gin_file=gin/meshes/tpu_v5p_1t.gin [--json]
python -m flm_jax.plan --gin_file=gin/models/1t.gin --gin_file=gin/meshes/tpu_v5p_1t.gin --compile  # needs libtpu

Batch size, sequence length and microbatches come from the flags, else from TrainConfig if a gin file binds it
(the pod layouts in gin/meshes/ do), else one sequence per batch shard at max_position_embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import gin
from flm_jax import aot, cli
from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.optim import OptimizerConfig
from flm_jax.partitioning import MeshLayout
from flm_jax.planning import format_comparison, format_plan, make_plan
from flm_jax.topology import parse_slice


def train_setting(name: str, flag_value):
    """A flag's value, else TrainConfig.<name> where a gin file binds it, else None."""
    if flag_value is not None:
        return flag_value
    try:
        return gin.query_parameter(f"TrainConfig.{name}")
    except ValueError:
        return None


def main(argv=None) -> None:
    p = cli.parser("Parameter count and per-device memory of a model on a mesh layout; --compile: compiled for TPU.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--num_devices", type=int, default=None, help="override the mesh file's device count")
    p.add_argument("--batch_size", type=int, default=None, help="global batch in sequences")
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--num_microbatches", type=int, default=None)
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the train step for a TPU slice (needs libtpu: pip install -r requirements-tpu-compile.txt)",
    )
    p.add_argument("--topology", default=None, help="TPU slice to compile for, e.g. v5p-128 (64 chips), v5e-256")
    p.add_argument("--peak_flops", type=float, default=None, help="per-chip peak FLOP/s (default: the datasheet)")
    args = cli.parse(p, argv, reads_data=False)
    model_cfg, layout = cli.configured(TeleFLMConfig), cli.configured(MeshLayout)
    batch_size = train_setting("batch_size", args.batch_size)
    seq_len = train_setting("seq_len", args.seq_len)
    num_microbatches = train_setting("num_microbatches", args.num_microbatches) or 1
    if not args.compile:
        if args.topology:
            raise ConfigError("--topology is the slice to compile for; add --compile.")
        plan = make_plan(model_cfg, layout, args.num_devices, batch_size, seq_len, num_microbatches)
        print(json.dumps(plan) if args.json else format_plan(plan))
        return

    name = args.topology or layout.topology
    if name is None:
        raise ConfigError(
            f"MeshLayout {layout.name!r} names no TPU slice: pass --topology (e.g. --topology=v5p-128) or use a "
            "mesh file that sets MeshLayout.topology (gin/meshes/tpu_*.gin)."
        )
    tpu = parse_slice(name)
    if args.num_devices not in (None, tpu.num_chips):
        raise ConfigError(f"--num_devices={args.num_devices} but {tpu.name} has {tpu.num_chips} chips.")
    if layout.num_devices is None:
        layout = dataclasses.replace(layout, num_devices=tpu.num_chips)
    if layout.device_memory_gib is None:
        layout = dataclasses.replace(layout, device_memory_gib=tpu.chip.hbm_gib)
    plan = make_plan(model_cfg, layout, tpu.num_chips, batch_size, seq_len, num_microbatches)
    print(
        f"Compiling the train step for {tpu.name} ({tpu.topology_name}, {tpu.num_chips} chips) ...",
        file=sys.stderr,
        flush=True,
    )
    compiled = aot.compile_train_step(
        model_cfg,
        layout,
        cli.configured(OptimizerConfig),
        tpu,
        plan["batch_size"],
        plan["seq_len"],
        plan["num_microbatches"],
        train_setting("z_loss", None) or 0.0,
        args.peak_flops,
    )
    plan["compiled"] = compiled.report
    plan["estimate_error"] = plan["total_gib_per_device"] / compiled.report["total_gib_per_device"] - 1
    print(json.dumps(plan) if args.json else format_comparison(plan))


if __name__ == "__main__":
    cli.run_tool("plan", main)
