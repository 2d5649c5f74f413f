"""Grow a trained checkpoint: `python -m flm_jax.grow --gin_file=gin/growth/X.gin --from_workdir=SRC --workdir=DST`.

Restores SRC's checkpoint (latest, or --step) onto the mesh layout the gin files give, applies the GrowthSpec to
the parameters and Adam moments under jit with the target shardings (so it runs shard by shard), measures function
preservation on a probe batch of validation data (max |Δlogit| and Δloss; MSG models at mask 0), refuses to write
when the change exceeds GrowthSpec.tolerance, and writes DST/checkpoints/<same step>, DST/config.gin and
DST/growth.json. `python -m flm_jax.train --workdir=DST --gin.TrainConfig.steps=N` continues (mask ramp included).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from flm_jax import cli, data
from flm_jax.checkpoint import Checkpointer, make_metadata
from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.growth import GrowthSpec, build_masks, grow_trees, growth_state, layer_order, target_config
from flm_jax.model import TeleFLM
from flm_jax.partitioning import MeshLayout, make_mesh
from flm_jax.step import lm_loss
from flm_jax.train import StateSpec

PROBE_TASK = "flm_prose"


def probe_batch(config: TeleFLMConfig, batch_size: int = 4, seq_len: int = 128) -> dict[str, np.ndarray]:
    """The first packed validation rows of the embedded corpus (deterministic)."""
    data.register_tasks()
    seq_len = min(seq_len, config.max_position_embeddings)
    return data.validation_set(PROBE_TASK, batch_size, seq_len).batches[0]


def logits_and_loss(config, params, batch, masks=None):
    logits = TeleFLM(config).apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
                                   masks)
    loss, _ = lm_loss(params, batch, config, masks=masks)
    return logits, loss


def layer_distances(config: TeleFLMConfig, params: Any, batch) -> list[float]:
    """1 - cos(h_in, h_out) per layer on the probe batch (the distance-based layer selection's calibration)."""
    _, state = TeleFLM(config).apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
                                     mutable=["intermediates"])
    return np.asarray(state["intermediates"]["layers"]["cos_distance"][0]).tolist()


def grow_checkpoint(src_workdir: str | Path, dst_workdir: str | Path, spec: GrowthSpec, layout: MeshLayout,
                    step: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    started = time.time()
    dst = Path(dst_workdir)
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise ConfigError(f"--workdir {dst} is not empty; grow never writes over a run. Choose an empty "
                              "folder or pass --overwrite.")
    src_ckpt = Checkpointer(src_workdir)
    step = src_ckpt.latest_step() if step is None else step
    if step is None or step not in src_ckpt.all_steps():
        raise ConfigError(f"{src_workdir} has no checkpoint{'' if step is None else f' at step {step}'} "
                          f"(it has {src_ckpt.all_steps()}).")
    src_meta = src_ckpt.metadata(step)
    if src_meta.get("growth"):
        raise ConfigError(f"The checkpoint at step {step} is in the middle of a growth ramp (mask "
                          f"{src_meta['growth'].get('mask')}); train past the ramp before growing again.")
    src_cfg = TeleFLMConfig.from_dict(src_meta["model_config"])
    tgt_cfg = target_config(src_cfg, spec)  # raises for shrinking, head_dim changes, broken kv groups
    mesh = make_mesh(layout)
    src_spec = StateSpec.build(src_cfg, mesh, layout, step + 1)
    try:
        state, data_state, _ = src_ckpt.restore(step, src_spec.abstract)
    except (ValueError, KeyError) as e:  # shapes in the checkpoint disagree with its metadata
        raise ConfigError(f"{src_workdir} step {step}: the stored arrays do not match the model config in its "
                          f"metadata, so it cannot be grown (was the checkpoint edited by hand?): {e}") from None
    src_ckpt.close()

    batch = probe_batch(src_cfg)
    distances = layer_distances(src_cfg, state["params"], batch) if spec.layer_strategy == "distance" else None
    order = layer_order(src_cfg, spec, distances)
    tgt_spec = StateSpec.build(tgt_cfg, mesh, layout, step + 1)
    rng = jax.random.key(spec.seed)

    def grow_state(params, opt_state):
        return grow_trees(params, opt_state, src_cfg, tgt_cfg, spec, order, rng)

    grow_started = time.time()
    with jax.set_mesh(mesh), nn.logical_axis_rules(layout.flax_rules()):
        params, opt_state = jax.jit(grow_state, out_shardings=(tgt_spec.shardings["params"],
                                                               tgt_spec.shardings["opt_state"]))(
            state["params"], state["opt_state"])
        jax.block_until_ready(params)
    grow_seconds = time.time() - grow_started

    msg = growth_state(src_cfg, order, step, spec.ramp_steps) if spec.mode == "msg" else None
    masks = build_masks(msg, tgt_cfg, 0.0) if msg else None
    old_logits, old_loss = logits_and_loss(src_cfg, state["params"], batch)
    new_logits, new_loss = logits_and_loss(tgt_cfg, params, batch, masks)
    real = batch["segment_ids"] != 0
    old_vocab = src_cfg.vocab_size
    delta = np.abs(np.asarray(new_logits)[..., :old_vocab] - np.asarray(old_logits))[real]
    report = {"source": str(src_workdir), "step": step, "max_abs_dlogit": float(delta.max()),
              "dloss": float(new_loss - old_loss), "loss_before": float(old_loss), "loss_after": float(new_loss),
              "grow_seconds": grow_seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "source_params": src_cfg.params_total(), "target_params": tgt_cfg.params_total(),
              "layer_order": order, "layer_distances": distances, "mode": spec.mode}
    print(f"growth {src_cfg.params_total():,} -> {tgt_cfg.params_total():,} parameters: max |Δlogit| "
          f"{report['max_abs_dlogit']:.3e}, Δloss {report['dloss']:+.3e} (loss {report['loss_before']:.4f})",
          flush=True)
    if not report["max_abs_dlogit"] <= spec.tolerance:
        raise ConfigError(f"Growth changed the function: max |Δlogit| {report['max_abs_dlogit']:.3e} > "
                          f"GrowthSpec.tolerance={spec.tolerance}. Nothing was written to {dst}.")

    if dst.exists() and overwrite:
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    metadata = make_metadata(tgt_cfg, stage_start_step=step, grown_from={"workdir": str(src_workdir), "step": step},
                             **({"growth": dict(msg, mask=0.0)} if msg else {}))
    out = Checkpointer(dst, async_save=False)
    out.save(step, {"step": state["step"], "params": params, "opt_state": opt_state}, data_state, metadata,
             force=True)
    out.close()
    src_gin = Path(src_workdir, "config.gin")
    overrides = "".join(f"TeleFLMConfig.{k} = {v!r}\n" for k, v in tgt_cfg.to_dict().items())
    (dst / "config.gin").write_text((src_gin.read_text() if src_gin.exists() else "") +
                                    f"\n# Grown from {src_workdir} step {step} by flm_jax.grow\n" + overrides)
    report["wall_seconds"] = time.time() - started
    (dst / "growth.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--from_workdir", required=True, help="the run to grow")
    p.add_argument("--workdir", required=True, help="an empty folder for the grown run")
    p.add_argument("--step", type=int, default=None, help="default: SRC's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --workdir")
    args = cli.parse(p, argv)
    try:
        grow_checkpoint(args.from_workdir, args.workdir, GrowthSpec(), MeshLayout(), args.step, args.overwrite)
    except ConfigError as e:
        raise SystemExit(f"grow: {e}") from None


if __name__ == "__main__":
    main()
