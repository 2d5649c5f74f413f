"""Grow a trained checkpoint into a new workdir: the library behind `python -m flm_jax.grow`.

Restores SRC's checkpoint onto the given mesh layout, applies the GrowthSpec to the parameters and Adam moments
(`flm_jax.growth.grow`, inside jit with the target shardings, so it runs shard by shard), measures function
preservation on a probe batch of validation data (max |Δlogit| and Δloss; MSG models at mask 0), refuses to write
when the change exceeds GrowthSpec.tolerance, and writes DST/checkpoints/<same step>, DST/config.gin and
DST/growth.json. `python -m flm_jax.train --workdir=DST --gin.TrainConfig.steps=N` continues (mask ramp included).
"""

from __future__ import annotations

import json
import resource
import time
from typing import Any

import flax.linen as nn
import jax

from flm_jax.config import ConfigError
from flm_jax.files import atomic_write_text, check_output_folder
from flm_jax.growth import grow
from flm_jax.growth.calibration import preservation, probe, probe_batch
from flm_jax.growth.msg import METADATA_KEY, MSGRamp
from flm_jax.growth.spec import GrowthSpec, target_config
from flm_jax.multihost import barrier
from flm_jax.optim import OptimizerConfig
from flm_jax.partitioning import MeshLayout, make_mesh
from flm_jax.paths import PathLike, as_path
from flm_jax.training.checkpoint import Checkpointer, config_gin_with_model, make_metadata
from flm_jax.training.checkpoint_reader import CheckpointReader
from flm_jax.training.state import StateSpec


def grow_checkpoint(
    src_workdir: PathLike,
    dst_workdir: PathLike,
    spec: GrowthSpec,
    layout: MeshLayout,
    step: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Grow SRC's checkpoint (latest, or `step`) into DST (see the module docstring); returns the report that
    DST/growth.json holds. Raises ConfigError, writing nothing, when the growth cannot or did not preserve the
    function."""
    started = time.time()
    seconds = {}  # per phase, for growth.json: what a grow spends its time on
    dst = as_path(dst_workdir)
    check_output_folder(dst, "--workdir")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"--workdir {dst} is not empty; grow never writes over a run. Choose an empty "
                "folder or pass --overwrite."
            )
    source = CheckpointReader(src_workdir, step)  # the folder, the step, the metadata and the stored shapes
    step, src_meta, src_cfg = source.step, source.metadata, source.config
    ramp = MSGRamp.from_metadata(src_meta)
    if ramp is not None:
        raise ConfigError(
            f"The checkpoint at step {step} is in the middle of a growth ramp (mask "
            f"{float(ramp.value(step)):g}); train past the ramp before growing again."
        )
    tgt_cfg = target_config(src_cfg, spec)  # raises for shrinking, head_dim changes, broken kv groups
    mesh = make_mesh(layout)
    # Only the state's structure matters here (the optimizer's settings never change it); the next run builds its
    # own optimizer from its config.
    src_spec = StateSpec.build(src_cfg, OptimizerConfig(), mesh, layout, step + 1)
    src_ckpt = Checkpointer(src_workdir)
    try:
        state, data_state, _ = src_ckpt.restore(step, src_spec.abstract)
    except (ValueError, KeyError) as e:  # shapes in the checkpoint disagree with its metadata
        raise ConfigError(
            f"{src_workdir} step {step}: the stored arrays do not match the model config in its "
            f"metadata, so it cannot be grown (was the checkpoint edited by hand?): {e}"
        ) from None
    src_ckpt.close()
    seconds["restore"] = time.time() - started

    phase_started = time.time()
    batch = probe_batch(src_cfg)
    before = probe(src_cfg, state["params"], batch, layer_distances=spec.layer_strategy == "distance")
    distances = before.layer_distances
    seconds["probe_source"] = time.time() - phase_started
    tgt_spec = StateSpec.build(tgt_cfg, OptimizerConfig(), mesh, layout, step + 1)
    phase_started = time.time()
    with jax.set_mesh(mesh), nn.logical_axis_rules(layout.flax_rules()):
        result = grow(
            state["params"],
            src_cfg,
            spec,
            jax.random.key(spec.seed),
            state["opt_state"],
            distances,
            step,
            shardings=(tgt_spec.shardings["params"], tgt_spec.shardings["opt_state"]),
        )
        jax.block_until_ready(result.params)
    step_array = state["step"]
    # The source's arrays are not needed past the growth: freed, their memory serves the probe and the save (the
    # peak RSS of a 210M -> 407M growth fell from 11.3 to 9.2 GiB).
    del state
    seconds["grow"] = time.time() - phase_started

    phase_started = time.time()
    masks = result.ramp.masks(tgt_cfg, 0.0) if result.ramp else None
    preserved = preservation(before, probe(tgt_cfg, result.params, batch, masks), batch)
    seconds["probe_target"] = time.time() - phase_started
    report = {
        "source": str(src_workdir),
        "step": step,
        **preserved,
        "grow_seconds": seconds["grow"],
        "phase_seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "source_params": src_cfg.params_total(),
        "target_params": tgt_cfg.params_total(),
        "layer_order": result.order,
        "layer_distances": distances,
        "mode": spec.mode,
    }
    print(
        f"growth {src_cfg.params_total():,} -> {tgt_cfg.params_total():,} parameters: max |Δlogit| "
        f"{report['max_abs_dlogit']:.3e}, Δloss {report['dloss']:+.3e} (loss {report['loss_before']:.4f})",
        flush=True,
    )
    if not report["max_abs_dlogit"] <= spec.tolerance:
        raise ConfigError(
            f"Growth changed the function: max |Δlogit| {report['max_abs_dlogit']:.3e} > "
            f"GrowthSpec.tolerance={spec.tolerance}. Nothing was written to {dst}."
        )

    if dst.exists() and overwrite and jax.process_index() == 0:
        dst.rmtree()
    barrier("flm_jax.grow: destination cleared")
    dst.mkdir(parents=True, exist_ok=True)
    metadata = make_metadata(
        tgt_cfg,
        stage_start_step=step,
        grown_from={"workdir": str(src_workdir), "step": step},
        **({METADATA_KEY: result.ramp.to_metadata(step)} if result.ramp else {}),
    )
    phase_started = time.time()
    out = Checkpointer(dst, async_save=False)
    out.save(
        step,
        {"step": step_array, "params": result.params, "opt_state": result.opt_state},
        data_state,
        metadata,
        force=True,
    )
    out.close()
    seconds["save"] = time.time() - phase_started  # report holds `seconds`: growth.json gets this phase too
    report["wall_seconds"] = time.time() - started
    phases = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
    print(f"grown checkpoint written to {dst} in {report['wall_seconds']:.1f} s ({phases})", flush=True)
    if jax.process_index() != 0:  # every process wrote its shards of the checkpoint; process 0 writes the rest
        return report
    src_gin = as_path(src_workdir) / "config.gin"
    atomic_write_text(
        dst / "config.gin",
        config_gin_with_model(
            src_gin.read_text() if src_gin.exists() else "",
            tgt_cfg,
            f"Grown from {src_workdir} step {step} by flm_jax.grow",
        ),
    )
    atomic_write_text(dst / "growth.json", json.dumps(report, indent=1))
    return report
