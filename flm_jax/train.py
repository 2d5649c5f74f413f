"""Pre-training: `python -m flm_jax.train --gin_file=gin/experiments/tiny_pretrain.gin --workdir=DIR`.

Resumes from DIR's latest checkpoint when there is one (the model shape then comes from the checkpoint's metadata;
with no --gin_file, DIR/config.gin is reused). Writes DIR/config.gin (the operative gin config),
DIR/metrics.jsonl, DIR/tensorboard/ and DIR/checkpoints/.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from pathlib import Path
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np

from flm_jax import cli, data
from flm_jax.checkpoint import Checkpointer, make_metadata
from flm_jax.config import RUNTIME_FIELDS, ConfigError, TeleFLMConfig, human_count
from flm_jax.failpoints import maybe_crash
from flm_jax.growth.msg import ramp_done, ramp_value
from flm_jax.hardware import peak_flops_per_device
from flm_jax.metric_writer import MetricWriter
from flm_jax.optim import make_optimizer
from flm_jax.params import boxed_abstract_params, init_params, param_shardings
from flm_jax.partitioning import MeshLayout, batch_sharding, batch_split, make_mesh, replicated
from flm_jax.train_config import TrainConfig
from flm_jax.train_state import abstract_state, init_state, make_eval_step, make_train_step, state_shardings


def resolve_model_config(requested: TeleFLMConfig, metadata: dict | None) -> TeleFLMConfig:
    """On resume the checkpoint must hold the requested architecture; runtime settings (dtype, remat) may change."""
    if metadata is None:
        return requested
    saved = TeleFLMConfig.from_dict(metadata["model_config"]).to_dict()
    wanted = requested.to_dict()
    differs = {k: (saved[k], wanted[k]) for k in saved if k not in RUNTIME_FIELDS and saved[k] != wanted[k]}
    if differs:
        raise ConfigError(
            "The checkpoint in this workdir has another model shape than the config: " +
            ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in differs.items()) +
            ". Use a new --workdir, or omit --gin_file to continue with the workdir's own config.gin "
            "(a grown checkpoint: `python -m flm_jax.grow` wrote it).")
    return requested


def global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Every process holds the whole global batch (same deterministic stream); each device takes its slice."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


class Evaluator:
    """Validation loss and bits per byte for each eval task, over every validation document."""

    def __init__(self, tasks, batch_size, seq_len, config, layout, mesh, params_shardings):
        self.sets = {task: data.validation_set(task, batch_size, seq_len) for task in tasks}
        self.sharding = batch_sharding(mesh, layout)
        self.config, self.layout, self.mesh, self.params_shardings = config, layout, mesh, params_shardings
        self.use_growth(None)

    def use_growth(self, growth: dict | None) -> None:
        self.step = jax.jit(make_eval_step(self.config, self.layout, growth),
                            in_shardings=(self.params_shardings, self.sharding, replicated(self.mesh)))

    def __call__(self, params, step: int) -> dict[str, float]:
        results, total_nll, total_tokens, total_bytes = {}, 0.0, 0.0, 0
        for task, vset in self.sets.items():
            nll = tokens = 0.0
            for batch in vset.batches:
                n, t = self.step(params, global_batch(batch, self.sharding), step)
                nll, tokens = nll + float(n), tokens + float(t)
            results[f"val_loss/{task}"] = nll / tokens
            results[f"val_bpb/{task}"] = data.bits_per_byte(nll, vset.num_bytes)
            total_nll, total_tokens, total_bytes = total_nll + nll, total_tokens + tokens, total_bytes + vset.num_bytes
        results["val_loss"] = total_nll / total_tokens
        results["val_bpb"] = data.bits_per_byte(total_nll, total_bytes)
        return results


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Everything about a train state except its values: optimizer, schedule, shardings, abstract tree."""

    tx: Any
    schedule: Any
    shardings: dict
    abstract: dict

    @classmethod
    def build(cls, model_cfg: TeleFLMConfig, mesh, layout: MeshLayout, total_steps: int,
              start_step: int = 0) -> "StateSpec":
        with nn.logical_axis_rules(layout.flax_rules()):
            abstract_params = nn.meta.unbox(boxed_abstract_params(model_cfg))
        tx, schedule = make_optimizer(abstract_params, model_cfg, total_steps, start_step)
        shardings = state_shardings(tx, abstract_params, param_shardings(model_cfg, mesh, layout), mesh)
        return cls(tx, schedule, shardings, abstract_state(tx, abstract_params, shardings))


def train(workdir: str | Path, train_cfg: TrainConfig | None = None, model_cfg: TeleFLMConfig | None = None,
          layout: MeshLayout | None = None, until_step: int | None = None) -> dict[str, Any]:
    """Train (or resume) in workdir up to TrainConfig.steps, or stop early after `until_step` with a checkpoint
    (time-limited jobs; the next call continues). Returns the last logged metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train_cfg, layout = train_cfg or TrainConfig(), layout or MeshLayout()
    data.register_tasks()  # the default tasks plus any registered from gin
    mesh = make_mesh(layout)
    split = batch_split(mesh, layout)
    if train_cfg.batch_size % (split * train_cfg.num_microbatches):
        raise ConfigError(f"TrainConfig.batch_size={train_cfg.batch_size} must be a multiple of the mesh's batch "
                          f"split ({split}) x num_microbatches ({train_cfg.num_microbatches}).")

    ckpt = Checkpointer(workdir, train_cfg.checkpoint_every, train_cfg.max_to_keep, train_cfg.async_checkpointing)
    latest = ckpt.latest_step()
    saved_meta = ckpt.metadata(latest) if latest is not None else {}
    model_cfg = resolve_model_config(model_cfg or TeleFLMConfig(), saved_meta or None)
    if train_cfg.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"TrainConfig.seq_len={train_cfg.seq_len} exceeds TeleFLMConfig.max_position_embeddings="
                          f"{model_cfg.max_position_embeddings}.")
    # After a growth, this stage's learning-rate schedule starts at the step the checkpoint was grown at.
    spec = StateSpec.build(model_cfg, mesh, layout, train_cfg.steps, saved_meta.get("stage_start_step", 0))
    if jax.process_index() == 0:  # every configurable has been called by now
        (workdir / "config.gin").write_text(gin.operative_config_str())

    if latest is not None:
        state, data_state, _ = ckpt.restore(latest, spec.abstract)
        print(f"Resumed from {workdir}/checkpoints/{latest}.", flush=True)
    else:
        params = init_params(model_cfg, mesh, layout, jax.random.key(train_cfg.seed))
        state, data_state = init_state(params, spec.tx, spec.shardings), {}
    batches = resume_batches(train_cfg, data_state, int(state["step"]))
    metadata = make_metadata(model_cfg, **{k: v for k, v in saved_meta.items()
                                           if k not in ("format", "model_config", "layer_stack")})
    step = int(state["step"])
    if step >= min(until_step or train_cfg.steps, train_cfg.steps):
        print(f"Nothing to do: the checkpoint is at step {step} and TrainConfig.steps={train_cfg.steps}.", flush=True)
        ckpt.close()
        return {}
    loop = TrainLoop(train_cfg, model_cfg, layout, mesh, spec, metadata, workdir, step)
    try:
        return loop.run(state, batches, ckpt, min(until_step or train_cfg.steps, train_cfg.steps))
    finally:
        ckpt.wait()
        ckpt.close()
        loop.writer.close()


def resume_batches(train_cfg: TrainConfig, data_state: dict, step: int) -> data.BatchIterator:
    """Continue the checkpoint's data stream. An empty state (a new run, an import_hf checkpoint) starts the
    configured stream; a stream of another mixture, batch size or length (a new stage after growth) is replaced by
    a fresh one seeded with seed + step, so it does not replay the batches already seen."""
    if data_state and (data_state.get("name"), data_state.get("batch_size"), data_state.get("seq_len")) == (
            train_cfg.mixture, train_cfg.batch_size, train_cfg.seq_len):
        return data.BatchIterator.from_state(data_state)
    if data_state:
        print(f"The data stream changed ({data_state.get('name')}, batch {data_state.get('batch_size')} x "
              f"{data_state.get('seq_len')} -> {train_cfg.mixture}, batch {train_cfg.batch_size} x "
              f"{train_cfg.seq_len}): starting a fresh stream.", flush=True)
    return data.BatchIterator(train_cfg.mixture, "train", train_cfg.batch_size, train_cfg.seq_len,
                              train_cfg.seed + step)


class TrainLoop:
    """The jitted step, evaluation and logging of one run; folds MSG masks away when their ramp ends."""

    def __init__(self, train_cfg, model_cfg, layout, mesh, spec: StateSpec, metadata: dict, workdir: Path,
                 start_step: int):
        self.cfg, self.model_cfg, self.layout, self.mesh, self.spec = train_cfg, model_cfg, layout, mesh, spec
        self.metadata = metadata
        self.b_sharding = batch_sharding(mesh, layout)
        self.evaluator = Evaluator(train_cfg.eval_tasks, train_cfg.eval_batch_size, train_cfg.seq_len, model_cfg,
                                   layout, mesh, spec.shardings["params"]) if train_cfg.eval_tasks else None
        self.writer = MetricWriter(workdir, train_cfg.steps, start_step)
        self.tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
        self.flops_per_step = model_cfg.flops_per_token(train_cfg.seq_len) * self.tokens_per_step
        self.peak = peak_flops_per_device() * jax.device_count()
        self.set_growth(metadata.get("growth"))

    def set_growth(self, growth: dict | None) -> None:
        """(Re)compile the step for an MSG ramp in progress, or for the plain model."""
        self.growth = growth
        step = make_train_step(self.model_cfg, self.spec.tx, self.spec.schedule, self.layout,
                               self.cfg.num_microbatches, self.cfg.z_loss, growth)
        self.step_fn = jax.jit(step, in_shardings=(self.spec.shardings, self.b_sharding),
                               out_shardings=(self.spec.shardings, replicated(self.mesh)), donate_argnums=0)
        if self.evaluator:
            self.evaluator.use_growth(growth)
        if growth is None:
            self.metadata.pop("growth", None)

    def run(self, state, batches, ckpt: Checkpointer, stop: int) -> dict[str, Any]:
        cfg = self.cfg
        step = int(state["step"])
        if step == 0:
            self.writer.progress(0, f"{human_count(self.model_cfg.params_total())} parameters on mesh "
                                    f"{dict(self.mesh.shape)}, {human_count(self.tokens_per_step)} tokens/step")
        last: dict[str, Any] = {}
        interval_start, interval_steps, first = time.time(), 0, True
        with jax.set_mesh(self.mesh):
            while step < stop:
                batch = next(batches)
                crc = zlib.crc32(batch["inputs"].tobytes())
                state, metrics = self.step_fn(state, global_batch(batch, self.b_sharding))
                maybe_crash("mid_step", step + 1)
                step, interval_steps = step + 1, interval_steps + 1
                if self.growth is not None:
                    self.metadata["growth"]["mask"] = float(ramp_value(self.growth, step))
                    if ramp_done(self.growth, step):  # m = 1: the masked model is the plain model
                        self.set_growth(None)
                if step % cfg.log_every == 0 or step == stop or first:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    step_time = (time.time() - interval_start) / interval_steps
                    last = {**metrics, "step_time_s": step_time, "tokens_per_sec": self.tokens_per_step / step_time,
                            "mfu": self.flops_per_step / step_time / self.peak, "batch_crc32": crc,
                            "data_batches_consumed": batches.batches_consumed}
                    if self.evaluator and (step == cfg.steps or first or (cfg.eval_every and
                                                                          step % cfg.eval_every == 0)):
                        last.update(self.evaluator(state["params"], step))
                    self.log(step, last)
                    interval_start, interval_steps, first = time.time(), 0, False
                if ckpt.save(step, state, batches.state(), self.metadata, force=step == stop):
                    maybe_crash("mid_save", step)
        return last

    def log(self, step: int, record: dict[str, Any]) -> None:
        self.writer.write(step, record)
        val = f" val_loss {record['val_loss']:.4f} val_bpb {record['val_bpb']:.4f}" if "val_loss" in record else ""
        mask = f" mask {record['growth_mask']:.2f}" if "growth_mask" in record else ""
        self.writer.progress(step, f"loss {record['loss']:.4f} lr {record['lr']:.2e} gnorm "
                                   f"{record['grad_norm']:.3f} {record['tokens_per_sec']:.0f} tok/s "
                                   f"mfu {record['mfu']:.1%}{mask}{val}")


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="output folder; an existing run there is resumed")
    p.add_argument("--until_step", type=int, default=None,
                   help="stop after this step with a checkpoint (a later call continues to TrainConfig.steps)")
    cli.add_distributed_flags(p)
    args = cli.parse(p, argv)
    if not args.gin_file and (Path(args.workdir) / "config.gin").is_file():
        cli.load_gin([str(Path(args.workdir) / "config.gin")], args.gin_bindings)
    cli.init_distributed(args)
    try:
        last = train(args.workdir, until_step=args.until_step)
    except ConfigError as e:
        raise SystemExit(f"train: {e}") from None
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in last.items() if k.startswith(("val_", "loss"))}), flush=True)


if __name__ == "__main__":
    main()
