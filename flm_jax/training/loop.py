"""The training loop: `train()` runs (or resumes) one run in a workdir; `python -m flm_jax.train` calls it.

Every setting arrives as an argument (the entry point resolves gin once): the model, the mesh layout, the optimizer,
the TrainConfig and the hardware peak used for MFU. A resumed run takes the model shape from the checkpoint's
metadata and must match it. Writes WORKDIR/metrics.jsonl, WORKDIR/tensorboard/, WORKDIR/checkpoints/ and
WORKDIR/config.gin (the gin text the entry point passes).
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import jax
from etils import epath

from flm_jax import data
from flm_jax.config import MUP_BASE_FIELDS, RUNTIME_FIELDS, ConfigError, TeleFLMConfig, human_count
from flm_jax.files import atomic_write_text, check_output_folder
from flm_jax.growth.msg import METADATA_KEY, MSGRamp
from flm_jax.hardware import peak_flops_per_device
from flm_jax.optim import OptimizerConfig
from flm_jax.params import init_params
from flm_jax.partitioning import MeshLayout, batch_sharding, batch_split, global_batch, make_mesh
from flm_jax.paths import PathLike, as_path
from flm_jax.training.checkpoint import CONFIG_GIN, Checkpointer, checkpoint_dir, make_metadata
from flm_jax.training.config import TrainConfig
from flm_jax.training.evaluation import Evaluator
from flm_jax.training.init_from import INHERITED_FIELDS, source_params
from flm_jax.training.input import TrainInput, train_input
from flm_jax.training.input import describe as describe_input
from flm_jax.training.metrics import MetricWriter
from flm_jax.training.nonfinite import NonFiniteGuard
from flm_jax.training.preemption import PreemptionWatch
from flm_jax.training.profiling import StepTrace
from flm_jax.training.state import StateSpec, init_state
from flm_jax.training.step import jit_train_step


def resolve_model_config(requested: TeleFLMConfig, metadata: dict | None) -> TeleFLMConfig:
    """On resume the checkpoint must hold the requested architecture; runtime settings (dtype, remat) may change.
    A μP base shape the config leaves unset (None) is the checkpoint's."""
    if metadata is None:
        return requested
    saved = TeleFLMConfig.from_dict(metadata["model_config"]).to_dict()
    requested = requested.replace(**{k: saved[k] for k in MUP_BASE_FIELDS if getattr(requested, k) is None})
    wanted = requested.to_dict()
    differs = {k: (saved[k], wanted[k]) for k in saved if k not in RUNTIME_FIELDS and saved[k] != wanted[k]}
    if differs:
        raise ConfigError(
            "The checkpoint in this workdir has another model shape than the config: "
            + ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in differs.items())
            + ". Use a new --workdir, or omit --gin_file to continue with the workdir's own config.gin "
            "(a grown checkpoint: `python -m flm_jax.grow` wrote it)."
        )
    return requested


def train(
    workdir: PathLike,
    *,
    model_cfg: TeleFLMConfig,
    layout: MeshLayout,
    optimizer_cfg: OptimizerConfig,
    train_cfg: TrainConfig,
    peak_flops: float | None = None,
    until_step: int | None = None,
    config_gin: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) in workdir up to train_cfg.steps, or stop early after `until_step` with a checkpoint
    (time-limited jobs; the next call continues). `peak_flops` is one device's peak FLOP/s for MFU (default: the
    flm_jax.hardware table). `config_gin`, the run's gin config, becomes WORKDIR/config.gin once the workdir's
    checkpoint has been checked against the model (a refused run leaves the old file). Returns the last logged
    metrics."""
    workdir = as_path(workdir)
    check_output_folder(workdir, "--workdir")
    mesh = make_mesh(layout)
    split = batch_split(mesh, layout)
    if train_cfg.batch_size % (split * train_cfg.num_microbatches):
        raise ConfigError(
            f"TrainConfig.batch_size={train_cfg.batch_size} must be a multiple of the mesh's batch "
            f"split ({split}) x num_microbatches ({train_cfg.num_microbatches})."
        )

    # Everything is checked before the workdir is created: a refused run leaves the disk as it was.
    def open_checkpointer() -> Checkpointer:
        return Checkpointer(workdir, train_cfg.checkpoint_every, train_cfg.max_to_keep, train_cfg.async_checkpointing)

    ckpt = open_checkpointer() if checkpoint_dir(workdir).exists() else None
    latest = ckpt.latest_step() if ckpt else None
    saved_meta = ckpt.metadata(latest) if latest is not None else {}
    provenance, initial = {}, None
    if train_cfg.init_from and latest is None:
        model_cfg, initial, provenance = source_params(train_cfg.init_from, model_cfg, mesh, layout, train_cfg.seed)
    elif train_cfg.init_from:  # a resumed fine-tuning run keeps what it inherited from its source
        model_cfg = model_cfg.replace(**{k: saved_meta["model_config"][k] for k in INHERITED_FIELDS})
    model_cfg = resolve_model_config(model_cfg, saved_meta or None)
    for name in (train_cfg.mixture, *train_cfg.eval_tasks):  # JAX would clamp out-of-range token ids silently
        if model_cfg.vocab_size < data.required_vocab_size(name):
            raise ConfigError(
                f"{name!r} uses token ids up to {data.required_vocab_size(name) - 1} but TeleFLMConfig.vocab_size="
                f"{model_cfg.vocab_size}. Use a model with a larger vocabulary (a chat task needs the chat "
                "tokenizer's markers: e.g. gin/sft/tiny_sft.gin, vocab_size 2176)."
            )
    for name in ("seq_len", "eval_seq_len"):
        if (getattr(train_cfg, name) or 0) > model_cfg.max_position_embeddings:
            raise ConfigError(
                f"TrainConfig.{name}={getattr(train_cfg, name)} exceeds TeleFLMConfig.max_position_embeddings="
                f"{model_cfg.max_position_embeddings}."
            )
    # After a growth, this stage's learning-rate schedule starts at the step the checkpoint was grown at.
    spec = StateSpec.build(
        model_cfg, optimizer_cfg, mesh, layout, train_cfg.steps, saved_meta.get("stage_start_step", 0)
    )
    if ckpt is None:
        workdir.mkdir(parents=True, exist_ok=True)
        ckpt = open_checkpointer()
    if config_gin is not None and jax.process_index() == 0:
        atomic_write_text(workdir / CONFIG_GIN, config_gin)
    if latest is not None:
        state, data_state, _ = ckpt.restore(latest, spec.abstract)
        print(f"Resumed from {workdir}/checkpoints/{latest}.", flush=True)
    else:
        params = (
            initial if initial is not None else init_params(model_cfg, mesh, layout, jax.random.key(train_cfg.seed))
        )
        state, data_state = init_state(params, spec.tx, spec.shardings), {}
    step = int(state["step"])
    host_input = train_input(
        train_cfg, batch_sharding(mesh, layout), data_state, lambda shards: ckpt.iterator_states(latest, shards), step
    )
    describe_input(host_input.stream)
    # What every checkpoint of this run records besides the ramp: provenance such as grown_from or imported_from.
    base_metadata = {
        k: v for k, v in saved_meta.items() if k not in ("format", "model_config", "layer_stack", METADATA_KEY)
    } | provenance
    stop = min(until_step or train_cfg.steps, train_cfg.steps)
    if step >= stop:
        print(f"Nothing to do: the checkpoint is at step {step} and TrainConfig.steps={train_cfg.steps}.", flush=True)
        ckpt.close()
        return {}
    peak = peak_flops if peak_flops is not None else peak_flops_per_device()
    loop = TrainLoop(
        train_cfg,
        model_cfg,
        layout,
        mesh,
        spec,
        MSGRamp.from_metadata(saved_meta),
        workdir,
        step,
        peak * jax.device_count(),
    )
    preemption = PreemptionWatch(ckpt.manager)
    try:
        return loop.run(state, host_input, ckpt, stop, base_metadata, preemption)
    finally:
        preemption.close()
        loop.trace.close()
        ckpt.wait()
        ckpt.close()
        loop.writer.close()


class TrainLoop:
    """The jitted step, evaluation and logging of one run; drops the MSG masks when their ramp ends."""

    def __init__(
        self,
        train_cfg: TrainConfig,
        model_cfg: TeleFLMConfig,
        layout: MeshLayout,
        mesh,
        spec: StateSpec,
        ramp: MSGRamp | None,
        workdir: epath.Path,
        start_step: int,
        peak_flops_total: float,
    ):
        self.cfg, self.model_cfg, self.layout, self.mesh, self.spec = train_cfg, model_cfg, layout, mesh, spec
        self.b_sharding = batch_sharding(mesh, layout)
        self.evaluator = (
            Evaluator(
                train_cfg.eval_tasks,
                train_cfg.eval_batch_size,
                train_cfg.eval_seq_len or train_cfg.seq_len,
                model_cfg,
                layout,
                mesh,
                spec.shardings["params"],
                train_cfg.eval_split,
            )
            if train_cfg.eval_tasks
            else None
        )
        self.writer = MetricWriter(workdir, train_cfg.steps, start_step)
        self.trace = StepTrace(train_cfg.profile_steps, workdir / "tensorboard")
        self.tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
        self.flops_per_step = model_cfg.flops_per_token(train_cfg.seq_len) * self.tokens_per_step
        self.peak = peak_flops_total
        self.use_ramp(None if ramp is None or ramp.done(start_step) else ramp)

    def use_ramp(self, ramp: MSGRamp | None) -> None:
        """(Re)compile the step for an MSG ramp in progress, or for the plain model."""
        self.ramp = ramp
        self.step_fn = jit_train_step(
            self.model_cfg, self.spec, self.layout, self.mesh, self.cfg.num_microbatches, self.cfg.z_loss, ramp
        )
        if self.evaluator:
            self.evaluator.use_ramp(ramp)

    def metadata(self, step: int, base: dict[str, Any]) -> dict[str, Any]:
        """The metadata of a checkpoint at `step`: the model, provenance, and the ramp while it is in progress."""
        ramp = {METADATA_KEY: self.ramp.to_metadata(step)} if self.ramp is not None else {}
        return make_metadata(self.model_cfg, **base, **ramp)

    def run(
        self,
        state,
        host_input: TrainInput,
        ckpt: Checkpointer,
        stop: int,
        base_metadata: dict[str, Any],
        preemption: PreemptionWatch,
    ) -> dict[str, Any]:
        cfg, batches = self.cfg, host_input.stream
        step = int(state["step"])
        if step == 0:
            self.writer.progress(
                0,
                f"{human_count(self.model_cfg.params_total())} parameters on mesh "
                f"{dict(self.mesh.shape)}, {human_count(self.tokens_per_step)} tokens/step",
            )
        last: dict[str, Any] = {}
        guard = NonFiniteGuard(cfg.max_nonfinite_steps)
        interval_start, interval_steps, first = time.time(), 0, True
        with jax.set_mesh(self.mesh):
            while step < stop:
                batch = next(batches)
                crc = zlib.crc32(batch["inputs"].tobytes())
                self.trace.before(step + 1)
                state, metrics = self.step_fn(state, global_batch(batch, self.b_sharding, cfg.batch_size))
                guard.count(metrics["nonfinite"])
                step, interval_steps = step + 1, interval_steps + 1
                self.trace.after(step, metrics)
                preempted = preemption.reached(step)
                if self.ramp is not None and self.ramp.done(step):  # m = 1: the masked model is the plain model
                    self.use_ramp(None)
                if step % cfg.log_every == 0 or step == stop or first or preempted:
                    skipped = guard.check(step, ckpt.describe_latest())
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    step_time = (time.time() - interval_start) / interval_steps
                    last = {
                        **metrics,
                        "step_time_s": step_time,
                        "tokens_per_sec": self.tokens_per_step / step_time,
                        "mfu": self.flops_per_step / step_time / self.peak,
                        "flops_per_step": self.flops_per_step,
                        "batch_crc32": crc,
                        "data_batches_consumed": batches.batches_consumed,
                        "nonfinite_steps": skipped,
                    }
                    if self.evaluator and (
                        step == cfg.steps or first or (cfg.eval_every and step % cfg.eval_every == 0)
                    ):
                        last.update(self.evaluator(state["params"], step))
                    self.log(step, last)
                    interval_start, interval_steps, first = time.time(), 0, False
                if ckpt.will_save(step, force=step == stop or preempted):
                    guard.check(step, ckpt.describe_latest())
                    guard.check_saveable(state["params"], step, ckpt.describe_latest())
                    snapshots = batches.iterator_states(host_input.snapshot_shards)
                    ckpt.save(step, state, batches.state(), self.metadata(step, base_metadata), True, snapshots)
                if preempted:
                    self.writer.progress(step, "preempted (SIGTERM): saved this step; run the same command to resume")
                    break
        return last

    def log(self, step: int, record: dict[str, Any]) -> None:
        self.writer.write(step, record)
        val = f" val_loss {record['val_loss']:.4f} val_bpb {record['val_bpb']:.4f}" if "val_loss" in record else ""
        mask = f" mask {record['growth_mask']:.2f}" if "growth_mask" in record else ""
        skipped = f" skipped {record['nonfinite_steps']}" if record.get("nonfinite_steps") else ""
        self.writer.progress(
            step,
            f"loss {record['loss']:.4f} lr {record['lr']:.2e} gnorm "
            f"{record['grad_norm']:.3f} {record['tokens_per_sec']:.0f} tok/s "
            f"mfu {record['mfu']:.1%}{mask}{skipped}{val}",
        )
