"""AdamW with gradient clipping, learning-rate schedules and per-parameter multipliers (the μP hook).

The chain is clip -> Adam -> decoupled weight decay -> per-parameter multiplier -> -schedule(step). The
multiplier scales the whole update of a parameter (its Adam step and its decay), so a parameter class whose
learning rate is lr·m_lr and whose decay is wd·m_wd decays at lr·m_lr·wd·m_wd per step, as in μP's Adam rules.
The multipliers come from a function of (params, config); the default is flm_jax.mup's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import gin
from flm_jax.config import ConfigError, TeleFLMConfig, check_field_types
from flm_jax.mup import param_multipliers

SCHEDULES = ("cosine", "linear", "constant")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    peak_learning_rate: float = 3e-4
    schedule: str = "cosine"  # warmup, then cosine / linear decay to end_lr_ratio·peak, or constant
    warmup_steps: int = 100
    decay_steps: int | None = None  # steps from the end of warmup to the end of decay; None: the run's length
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float | None = 1.0

    def __post_init__(self):
        check_field_types(self)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"OptimizerConfig.schedule={self.schedule!r} is not one of {SCHEDULES}.")
        if self.warmup_steps < 0 or self.peak_learning_rate <= 0:
            raise ConfigError("OptimizerConfig needs warmup_steps >= 0 and peak_learning_rate > 0.")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int, start_step: int = 0) -> optax.Schedule:
    """Warmup then decay over the steps start_step..total_steps. A stage that starts after a growth (start_step
    > 0) gets its own warmup and peak, as FLM-101B's stages did; warmup_steps=0 rewinds straight to the peak."""
    inner = _stage_schedule(cfg, total_steps - start_step)
    return inner if not start_step else lambda step: inner(step - start_step)


def _stage_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak, warmup = cfg.peak_learning_rate, cfg.warmup_steps
    decay_steps = max(cfg.decay_steps or (total_steps - warmup), 1)
    end = peak * cfg.end_lr_ratio
    warmup_fn = optax.linear_schedule(peak / max(warmup, 1), peak, max(warmup - 1, 1))
    if cfg.schedule == "cosine":
        decay_fn = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay_fn = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay_fn = optax.constant_schedule(peak)
    if warmup == 0:
        return decay_fn
    return optax.join_schedules([warmup_fn, decay_fn], [warmup])


MultipliersFn = Callable[[Any, TeleFLMConfig], tuple[Any, Any]]


def _scale_each(multipliers: Any) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _decay_each(weight_decay: float, multipliers: Any) -> optax.GradientTransformation:
    def update(updates, state, params):
        decayed = jax.tree_util.tree_map(
            lambda u, p, m: u + (weight_decay * m) * p if m else u, updates, params, multipliers
        )
        return decayed, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(
    params: Any,
    config: TeleFLMConfig,
    cfg: OptimizerConfig,
    total_steps: int,
    start_step: int = 0,
    multipliers: MultipliersFn = param_multipliers,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The AdamW chain for a parameter tree (abstract is fine) and its learning-rate schedule."""
    schedule = learning_rate_schedule(cfg, total_steps, start_step)
    lr_mult, wd_mult = multipliers(params, config)
    # The chain's state structure never depends on the settings, so any checkpoint restores under any config.
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity()]
    parts += [
        optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps, mu_dtype=jnp.float32),
        _decay_each(cfg.weight_decay, wd_mult),
        _scale_each(lr_mult),
        optax.scale_by_learning_rate(schedule),
    ]
    return optax.chain(*parts), schedule
