"""In-memory growth experiments: train, grow, train ... on fixed batches, one device, no checkpoints, with the
validation loss recorded against steps, training FLOPs and wall time. The step is the trainer's own
(`flm_jax.training.step.make_train_step`) and growth is `flm_jax.growth.grow`, so what an experiment finds is what
`python -m flm_jax.schedule` does. experiments/growth_vs_scratch.py and experiments/growth_ablations.py use it.

A schedule is a list of `Stage`s: the first trains a fresh model, each later one grows the previous stage's model
(its `GrowthSpec`) and trains on. How a growth treats the learning rate and the optimizer state is the `Recipe`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flm_jax import data
from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.growth import GrowthSpec, grow
from flm_jax.growth.calibration import layer_distances
from flm_jax.growth.msg import masks_at
from flm_jax.model import TeleFLM
from flm_jax.optim import OptimizerConfig, make_optimizer
from flm_jax.partitioning import MeshLayout
from flm_jax.training.short_runs import draw_batches
from flm_jax.training.step import lm_loss, make_train_step

# The learning rate of a stage after a growth: its own warmup then decay to the stage's end (FLM-101B), straight back
# to the peak and decay (MSG's rewind), or the one schedule of the whole run going on as if nothing had grown.
LR_POLICIES = ("rewarm", "rewind", "continue")
# Adam state after a growth: old entries keep their moments, new ones get mu 0 and nu 0 ('copied_zero', MSG's code)
# or the mean of the tensor's old nu ('copied_mean'); or all of Adam's state starts again from zero ('reset': moments
# and bias-correction count; the learning-rate schedule goes on).
OPT_POLICIES = ("copied_mean", "copied_zero", "reset")
JUMP_OFFSETS = (2, 5, 10, 20)  # steps after a growth at which the loss jump is measured


@dataclasses.dataclass(frozen=True)
class Stage:
    steps: int  # steps this stage trains
    growth: GrowthSpec | None = None  # how the previous stage's model grows into this one (None for the first)


@dataclasses.dataclass(frozen=True)
class Recipe:
    lr_policy: str = "rewarm"
    opt_policy: str | None = None  # None: as the GrowthSpec's new_moments says (old entries copied)
    warmup_steps: int = 10  # of a stage after growth under 'rewarm'

    def __post_init__(self):
        if self.lr_policy not in LR_POLICIES or self.opt_policy not in (None, *OPT_POLICIES):
            raise ConfigError(f"Recipe: lr_policy must be one of {LR_POLICIES}, opt_policy one of {OPT_POLICIES}.")


@dataclasses.dataclass
class Curve:
    """Validation loss of one run at its evaluation points, with cumulative training FLOPs and seconds."""

    steps: list[int] = dataclasses.field(default_factory=list)
    flops: list[float] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    train_loss: list[float] = dataclasses.field(default_factory=list)  # every step
    growths: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # step, loss before, jump, shapes

    def add(self, step: int, flops: float, seconds: float, val: float) -> None:
        self.steps.append(step)
        self.flops.append(flops)
        self.seconds.append(seconds)
        self.val_loss.append(val)

    @property
    def final_loss(self) -> float:
        return self.val_loss[-1]

    def flops_to_reach(self, loss: float) -> float | None:
        """Training FLOPs at which the validation loss first reaches `loss` (linear between evaluations), or None."""
        for i, v in enumerate(self.val_loss):
            if v <= loss:
                if i == 0:
                    return self.flops[0]
                v0, f0 = self.val_loss[i - 1], self.flops[i - 1]
                return f0 + (self.flops[i] - f0) * (v0 - loss) / (v0 - v)
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def experiment_data(
    batch_size: int, seq_len: int, steps: int, eval_batches_per_domain: int, seed: int = 0
) -> tuple[Callable[[int], dict], list[dict]]:
    """The embedded corpus's training stream (flm_default, drawn once: every run of a seed sees the same batch at the
    same step) and a fixed validation set, the first packed batches of the prose and code validation splits."""
    train = draw_batches("flm_default", "train", steps, batch_size, seq_len, seed)
    evals = [
        batch
        for task in ("flm_prose", "flm_code")
        for batch in data.first_validation_batches(task, batch_size, seq_len, eval_batches_per_domain)
    ]
    return train.__getitem__, evals


def fresh_params(config: TeleFLMConfig, seed: int) -> Any:
    init = jax.jit(TeleFLM(config).init)  # one compile; run eagerly, every operation compiled on its own
    return nn.meta.unbox(init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def make_evaluator(config: TeleFLMConfig, eval_batches: Sequence[dict], ramp=None) -> Callable[[Any, int], float]:
    """params, step -> mean validation NLL per token over `eval_batches` (masks of the ramp at that step)."""

    @jax.jit
    def sums(params, batch, step):
        aux = lm_loss(params, batch, config, masks=masks_at(ramp, config, step))[1]
        return aux["nll_sum"], aux["num_tokens"]

    def evaluate(params, step: int) -> float:
        totals = [sums(params, b, step) for b in eval_batches]
        loss = float(sum(t[0] for t in totals) / sum(t[1] for t in totals))
        return loss if math.isfinite(loss) else float("inf")

    return evaluate


def stage_schedule_config(optimizer: OptimizerConfig, recipe: Recipe, grown: bool) -> OptimizerConfig:
    """The optimizer settings of a stage that decays over its own steps: after a growth, the recipe's warmup
    ('rewarm') or none ('rewind')."""
    if not grown:
        return optimizer
    warmup = recipe.warmup_steps if recipe.lr_policy == "rewarm" else 0
    return dataclasses.replace(optimizer, warmup_steps=warmup, decay_steps=None)


def reset_adam(opt_state: Any) -> Any:
    """Adam's moments and its bias-correction count back to zero; the schedule's own count goes on."""

    def visit(node):
        if isinstance(node, optax.ScaleByAdamState):
            zeros = jax.tree_util.tree_map(jnp.zeros_like, (node.mu, node.nu))
            return node._replace(count=jnp.zeros_like(node.count), mu=zeros[0], nu=zeros[1])
        return node

    return jax.tree_util.tree_map(visit, opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))


def run_schedule(
    first: TeleFLMConfig,
    stages: Sequence[Stage],
    optimizer: OptimizerConfig,
    train_batch: Callable[[int], dict],
    eval_batches: Sequence[dict],
    eval_every: int,
    seed: int = 0,
    recipe: Recipe = Recipe(),
    start: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Curve, dict[str, Any]]:
    """Train the stages in turn on `train_batch(step)` (the same stream for every stage and run) and evaluate every
    `eval_every` steps, at each growth and at JUMP_OFFSETS after it. `start` (a `state` this function returned after
    the stages before, with its curve) resumes after them: ablations share one trained first stage. Returns the curve
    and the final state {"config", "params", "opt_state", "step", "curve"}."""
    total = sum(s.steps for s in stages) + (start["step"] if start else 0)
    if start is None:
        config, params, opt_state, step, curve = first, fresh_params(first, seed), None, 0, Curve()
        flops = seconds = 0.0
    else:
        # Copies: the train step donates its state, and `start` must survive for the next run that shares it.
        params, opt_state = jax.tree_util.tree_map(jnp.copy, (start["params"], start["opt_state"]))
        config, step = start["config"], start["step"]
        curve = Curve(**{k: list(v) for k, v in dataclasses.asdict(start["curve"]).items()})
        flops, seconds = curve.flops[-1], curve.seconds[-1]
    seq_len = eval_batches[0]["inputs"].shape[1]
    for stage in stages:
        ramp, started = None, time.time()
        stage_start, stage_end = step, step + stage.steps
        if stage.growth is not None:
            if opt_state is None:
                raise ConfigError("a schedule's first stage trains a fresh model: give it no growth.")
            spec = stage.growth
            if recipe.opt_policy in ("copied_mean", "copied_zero"):
                spec = dataclasses.replace(spec, new_moments=recipe.opt_policy.removeprefix("copied_"))
            distances = layer_distances(config, params, eval_batches[0]) if spec.layer_strategy == "distance" else None
            result = grow(
                params, config, spec, jax.random.key(seed * 1000 + step), opt_state, distances, start_step=step
            )
            loss_before = curve.val_loss[-1] if curve.steps and curve.steps[-1] == step else None
            growth = {
                "step": step,
                "source_params": config.params_total(),
                "target_params": result.config.params_total(),
                "loss_before": loss_before,
            }
            config, params, opt_state, ramp = result.config, result.params, result.opt_state, result.ramp
        if recipe.lr_policy == "continue":  # one schedule over the whole run
            tx, schedule = make_optimizer(params, config, optimizer, total)
        else:  # each stage decays over its own steps (the first warms up as configured)
            stage_opt = stage_schedule_config(optimizer, recipe, stage.growth is not None)
            tx, schedule = make_optimizer(params, config, stage_opt, stage_end, stage_start)
        if opt_state is None:
            opt_state = tx.init(params)
        elif stage.growth is not None and recipe.opt_policy == "reset":
            opt_state = reset_adam(opt_state)
        train_step = jax.jit(make_train_step(config, tx, schedule, MeshLayout(), ramp=ramp), donate_argnums=0)
        evaluate = make_evaluator(config, eval_batches, ramp)
        state = {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": opt_state}
        flops_per_step = config.flops_per_token(seq_len) * train_batch(0)["inputs"].size
        seconds += time.time() - started  # growth (and compilation) counts as wall time
        if stage.growth is None and step == 0:
            curve.add(0, 0.0, 0.0, evaluate(state["params"], 0))
        if stage.growth is not None and growth["loss_before"] is None:
            growth["loss_before"] = evaluate(state["params"], step)
        jump_points = {stage_start + k for k in JUMP_OFFSETS} if stage.growth is not None else set()
        while step < stage_end:
            tick = time.time()
            state, metrics = train_step(state, train_batch(step))
            curve.train_loss.append(float(metrics["loss"]))  # float() waits for the step: honest wall time
            seconds += time.time() - tick
            flops += flops_per_step
            step += 1
            if not math.isfinite(curve.train_loss[-1]):
                curve.add(step, flops, seconds, float("inf"))
                break
            if step % eval_every == 0 or step in jump_points or step == stage_end:
                curve.add(step, flops, seconds, evaluate(state["params"], step))
        if stage.growth is not None:
            after = [v for s, v in zip(curve.steps, curve.val_loss) if s in jump_points]
            growth["jump"] = max(after) - growth["loss_before"] if after else float("nan")
            curve.growths.append(growth)
        params, opt_state = state["params"], state["opt_state"]
        if log:
            log(
                f"stage to step {step}: {config.params_total() / 1e6:.2f}M parameters, val loss "
                f"{curve.final_loss:.4f}, {seconds:.0f} s, {flops / 1e12:.2f} TFLOP"
            )
        if not math.isfinite(curve.final_loss):
            break
    final = {"config": config, "params": params, "opt_state": opt_state, "step": step, "curve": curve}
    return curve, final


def compute_saving(scratch: Curve, grown: Curve) -> dict[str, Any]:
    """How much less training compute the grown schedule needed for a validation loss that both runs reached.

    The loss is the scratch run's final loss when the grown schedule reached it (then the saving is scratch FLOPs /
    the FLOPs the grown schedule needed), else the grown schedule's final loss (then: the FLOPs the scratch run
    needed to reach it / all the grown schedule's FLOPs). Above 1, growing saved compute; below 1, it cost more."""
    needed = grown.flops_to_reach(scratch.final_loss)
    if needed is not None:  # (needed 0: the grown schedule started at that loss, an untrained scratch run)
        saving = scratch.flops[-1] / needed if needed > 0 else float("inf")
        return {"compute_saving": saving, "grown_reached_scratch_loss": True, "matched_loss": scratch.final_loss}
    scratch_needed = scratch.flops_to_reach(grown.final_loss)
    saving = (scratch_needed if scratch_needed is not None else float("inf")) / grown.flops[-1]
    return {"compute_saving": saving, "grown_reached_scratch_loss": False, "matched_loss": grown.final_loss}


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def experiment_flags(description: str, add_flags: Callable[[Any], None] | None = None):
    """The command line of a growth experiment script: --out DIR (created) and its setting, --quick (minutes on a
    2-core CPU), --smoke (seconds: every code path once, meaningless numbers; the tests run it) or the full one by
    default. Returns the parsed flags with `.setting` set and `.out` a Path."""
    from flm_jax import cli

    p = cli.parser(description)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the small setting (about 10 minutes on a 2-core CPU)")
    p.add_argument("--smoke", action="store_true", help="seconds, every code path once, meaningless numbers (tests)")
    if add_flags:
        add_flags(p)
    args = cli.parse(p)
    args.setting = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return args
