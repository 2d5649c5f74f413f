"""MSG (Masked Structural Growth): which structure is new, the mask ramp, and the masks the model uses.

A grown checkpoint carries its ramp in metadata["growth"] (JSON, the field names of `MSGRamp` plus "mask", the
value at the checkpoint's step). The ramp value m(step) = clip((step - start_step) / ramp_steps, 0, 1) is computed
from the traced step inside the jitted train step, so the ramp never recompiles. At m = 1 the masked model is
exactly the plain model (masked RMS over all coordinates is the plain RMS), so the trainer drops the masks once
the ramp has ended. docs/growth_math.md has the mathematics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from flm_jax.config import TeleFLMConfig
from flm_jax.model import GrowthMasks

METADATA_KEY = "growth"


@dataclasses.dataclass(frozen=True)
class MSGRamp:
    """The mask ramp of one MSG growth: new structure is scaled by m(step), old structure by 1."""

    start_step: int
    ramp_steps: int
    old_hidden: int
    old_heads: int
    old_ffn: int
    new_layers: tuple[bool, ...]  # per layer of the grown stack: True for a layer the growth added
    form: str = "sublayer"  # where the masks apply (GrowthMasks); checkpoints from before the option have none

    @classmethod
    def after_growth(
        cls,
        src: TeleFLMConfig,
        order: Sequence[tuple[int, bool]],
        start_step: int,
        ramp_steps: int,
        form: str = "sublayer",
    ) -> MSGRamp:
        return cls(
            int(start_step),
            int(ramp_steps),
            src.hidden_size,
            src.num_attention_heads,
            src.intermediate_size,
            tuple(bool(new) for _, new in order),
            form,
        )

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> MSGRamp | None:
        """The ramp recorded in checkpoint metadata, or None for a plain checkpoint."""
        state = metadata.get(METADATA_KEY)
        if not state:
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "new_layers" else v) for k, v in state.items() if k in fields})

    def to_metadata(self, step: int) -> dict[str, Any]:
        """The JSON record of the ramp at `step` (what a checkpoint at that step stores)."""
        return {**dataclasses.asdict(self), "new_layers": list(self.new_layers), "mask": float(self.value(step))}

    def value(self, step) -> jnp.ndarray:
        """m(step), traceable: `step` may be a traced array."""
        return jnp.clip((jnp.asarray(step, jnp.float32) - self.start_step) / self.ramp_steps, 0.0, 1.0)

    def done(self, step: int) -> bool:
        return step >= self.start_step + self.ramp_steps

    def masks(self, config: TeleFLMConfig, m) -> GrowthMasks:
        """1 on old structure, m on new structure, for the grown model `config`."""
        m = jnp.asarray(m, jnp.float32)

        def mask(size, old):
            return jnp.where(jnp.arange(size) < old, 1.0, m)

        layers = jnp.where(jnp.asarray(self.new_layers), m, 1.0)
        return GrowthMasks(
            hidden=mask(config.hidden_size, self.old_hidden),
            heads=mask(config.num_attention_heads, self.old_heads),
            ffn=mask(config.intermediate_size, self.old_ffn),
            layers=layers,
            form=self.form,
        )


def masks_at(ramp: MSGRamp | None, config: TeleFLMConfig, step) -> GrowthMasks | None:
    """The MSG masks at this (traced) step, or None for a plain model."""
    return None if ramp is None else ramp.masks(config, ramp.value(step))
