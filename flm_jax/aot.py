"""Compile the real train step ahead of time for a TPU slice, on a host without a TPU.

The step is `flm_jax.training.step.jit_train_step`, the function `flm_jax.train` runs: same model, optimizer,
shardings, remat policy, dtypes, microbatching and donation. It is lowered with abstract inputs on a mesh of the
slice's device descriptions (flm_jax.topology) and compiled by XLA's TPU compiler, so what it reports is what each
chip would hold and compute:
  memory   argument, output and aliased (donated) bytes, temporaries; the total is arguments + outputs - aliased +
           temporaries (+ code), the peak XLA planned for one chip.
  flops    the compiler's cost analysis of one step on one chip. XLA counts the body of a loop once, so the figure
           is scaled by how much more matmul work the traced step does with every scan (layers, microbatches)
           counted per iteration (`loop_scale`).
  time     the step at the chip's peak, and the model FLOPs utilisation that would give (model FLOPs, 6N + attention,
           over executed FLOPs: what rematerialisation leaves as the best case).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.optim import OptimizerConfig
from flm_jax.partitioning import MeshLayout, batch_sharding, make_mesh
from flm_jax.planning import GIB
from flm_jax.topology import TpuSlice
from flm_jax.training.state import StateSpec
from flm_jax.training.step import jit_train_step

# The packed batch flm_jax.data gives the train step (flm_jax/data/pipeline.py), as abstract arrays.
BATCH_DTYPES = {
    "inputs": jnp.int32,
    "targets": jnp.int32,
    "segment_ids": jnp.int32,
    "positions": jnp.int32,
    "loss_weights": jnp.float32,
}


def slice_mesh(layout: MeshLayout, tpu: TpuSlice):
    """The layout's mesh over the slice's chips, or a ConfigError that says how they disagree."""
    if layout.num_devices is not None and layout.num_devices != tpu.num_chips:
        raise ConfigError(
            f"MeshLayout {layout.name!r} is for {layout.num_devices} chips but {tpu.name} has {tpu.num_chips} "
            f"({tpu.topology_name}). Pass a slice of {layout.num_devices} chips to --topology, or a mesh file for "
            "this slice."
        )
    devices = tpu.devices()
    try:
        return make_mesh(layout, devices)
    except (ValueError, AssertionError, NotImplementedError) as e:  # jax cannot fold the mesh onto the torus
        raise ConfigError(
            f"MeshLayout {layout.name!r} mesh {layout.mesh_shape} does not map onto the {tpu.topology_name} "
            f"torus of {tpu.name}: {e}. Each mesh axis must be a product of whole physical axes "
            f"{tpu.shape}; choose sizes that are."
        ) from e


def abstract_batch(batch_size: int, seq_len: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=sharding) for k, dt in BATCH_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    compiled: jax.stages.Compiled
    spec: StateSpec
    mesh: jax.sharding.Mesh
    report: dict[str, Any]  # what `flm_jax.plan --compile --json` prints under "compiled"


def compile_train_step(
    model_cfg: TeleFLMConfig,
    layout: MeshLayout,
    optimizer_cfg: OptimizerConfig,
    tpu: TpuSlice,
    batch_size: int,
    seq_len: int,
    num_microbatches: int = 1,
    z_loss: float = 0.0,
    peak_flops: float | None = None,
) -> CompiledStep:
    """Compile one train step for the slice and report its per-chip memory and FLOPs. `peak_flops` (per chip)
    defaults to the chip's datasheet bf16 peak."""
    mesh = slice_mesh(layout, tpu)
    # The schedule's length changes no shape; the step is the same for any number of steps.
    spec = StateSpec.build(model_cfg, optimizer_cfg, mesh, layout, total_steps=1000)
    step = jit_train_step(model_cfg, spec, layout, mesh, num_microbatches, z_loss)
    batch = abstract_batch(batch_size, seq_len, batch_sharding(mesh, layout))
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(layout.flax_rules()):
        try:
            compiled = step.lower(spec.abstract, batch).compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise ConfigError(
                f"The step does not fit a {tpu.generation} chip: {str(e).strip().splitlines()[0]} Use more "
                "microbatches (TrainConfig.num_microbatches), a remat policy that keeps less "
                "(TeleFLMConfig.remat_policy), splash attention, or a larger slice (docs/scaling.md)."
            ) from e
        compile_seconds = time.perf_counter() - start
        jaxpr = jax.make_jaxpr(step)(spec.abstract, batch).jaxpr
    peak = peak_flops or tpu.chip.peak_flops
    compiler_flops = _cost(compiled)["flops"]
    scale = loop_scale(jaxpr)
    flops = compiler_flops * scale
    model_flops = model_cfg.flops_per_token(seq_len) * batch_size * seq_len / tpu.num_chips
    report = {
        "topology": tpu.name,
        "topology_name": tpu.topology_name,
        "num_chips": tpu.num_chips,
        "num_hosts": tpu.num_hosts,
        "compile_seconds": compile_seconds,
        **memory_report(compiled, layout.device_memory_gib or tpu.chip.hbm_gib),
        "compiler_flops_loop_bodies_once": compiler_flops,
        "loop_scale": scale,
        "flops_per_device": flops,
        "model_flops_per_device": model_flops,
        "peak_flops_per_device": peak,
        "step_time_at_peak_s": flops / peak,
        "mfu_at_peak": model_flops / flops,
        "uncounted_kernels": uncounted_kernels(jaxpr),
    }
    return CompiledStep(compiled, spec, mesh, report)


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost or "flops" not in cost:
        raise ConfigError("The TPU compiler gave no cost analysis for this step.")
    return cost


def matmul_flops(jaxpr, count_loops: bool = True) -> float:
    """Matmul FLOPs of a (traced) jaxpr: 2 x output elements x contracted size per dot_general, through every
    nested call (jit, remat, custom derivatives), a shard_map body once per device, and a scan body once per
    iteration (once in all with count_loops=False, as XLA's cost analysis counts a loop body). A Pallas kernel
    counts what it declares (`uncounted_kernels` lists those that declare nothing)."""
    total = 0.0
    for eqn, times in _equations(jaxpr, count_loops):
        if eqn.primitive.name == "dot_general":
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            contracted = math.prod(lhs_shape[d] for d in lhs_contracting)
            total += times * 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted
        elif eqn.primitive.name == "pallas_call" and eqn.params.get("cost_estimate") is not None:
            total += times * float(eqn.params["cost_estimate"].flops)
    return total


def uncounted_kernels(jaxpr) -> list[str]:
    """Names of the Pallas kernels that declare no cost: their FLOPs are in no count (splash attention's)."""
    return sorted(
        {
            str(eqn.params.get("name") or eqn.params.get("name_and_src_info") or "pallas_call").split()[0]
            for eqn, _ in _equations(jaxpr, False)
            if eqn.primitive.name == "pallas_call" and eqn.params.get("cost_estimate") is None
        }
    )


def _equations(jaxpr, count_loops: bool, times: float = 1.0):
    """(equation, how many times it runs) for every equation of the jaxpr and of the jaxprs inside it; a Pallas
    kernel's own jaxpr (one block's program) is not entered."""
    for eqn in jaxpr.eqns:
        yield eqn, times
        if eqn.primitive.name == "pallas_call":
            continue
        inner = times
        if eqn.primitive.name == "scan" and count_loops:
            inner *= eqn.params["length"]
        elif eqn.primitive.name == "shard_map":
            inner *= eqn.params["mesh"].size
        elif eqn.primitive.name == "cond":  # one branch runs: count their average (platform_dependent's are alike)
            inner /= len(eqn.params["branches"])
        for sub in _sub_jaxprs(eqn):
            yield from _equations(sub, count_loops, inner)


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def loop_scale(jaxpr) -> float:
    """How many times more matmul work the step does than a count of each loop body once: the factor that turns
    XLA's cost analysis of a scanned step into the FLOPs the step executes."""
    return matmul_flops(jaxpr) / matmul_flops(jaxpr, count_loops=False)


def memory_report(compiled, hbm_gib: float) -> dict[str, Any]:
    """Per-chip memory of a compiled step, in GiB, from XLA's memory analysis."""
    mem = compiled.memory_analysis()
    if mem is None:
        raise ConfigError("The compiler gave no memory analysis for this step.")
    parts = {
        "argument_gib": mem.argument_size_in_bytes,
        "output_gib": mem.output_size_in_bytes,
        "alias_gib": mem.alias_size_in_bytes,
        "temp_gib": mem.temp_size_in_bytes,
        "code_gib": mem.generated_code_size_in_bytes,
        "host_temp_gib": getattr(mem, "host_temp_size_in_bytes", 0),
    }
    total = parts["argument_gib"] + parts["output_gib"] - parts["alias_gib"] + parts["temp_gib"] + parts["code_gib"]
    report = {k: v / GIB for k, v in parts.items()}
    report["temp_gib_per_device"] = report.pop("temp_gib")
    report["total_gib_per_device"] = total / GIB
    report["hbm_gib"] = hbm_gib
    report["fits"] = total / GIB <= hbm_gib
    return report
