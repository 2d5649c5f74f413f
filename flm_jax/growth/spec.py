"""What a growth does: target sizes, methods, optimizer-state policy, MSG ramp; and the target config it implies."""

from __future__ import annotations

import dataclasses

import gin
from flm_jax.config import ConfigError, TeleFLMConfig, check_field_types

MODES = ("exact", "msg")
WIDTH_METHODS = ("new", "duplicate")  # new: fresh units (zero padding / zeroed outputs / masked); duplicate: copies
LAYER_STRATEGIES = ("stack", "interleave", "even", "distance")
NEW_MOMENT_POLICIES = ("mean", "zero")
# How the logit multiplier output_mult / mup_scale_factor follows a hidden-size growth d -> D (docs/growth.md):
# 'mup' divides it by D/d (μP's readout rule; the LM head is multiplied by D/d so logits are unchanged), 'keep'
# leaves it and the LM head as they are (also function-preserving).
READOUT_RULES = ("mup", "keep")
# MSG ramp forms (docs/growth_math.md): 'sublayer' gates each new layer's attention and MLP outputs and masks new
# heads / FFN units on their outputs; 'block' is MSG's own: a new layer as m·block(h) + (1-m)·h, new heads masked
# on Q, K and V, new FFN units before the activation.
MSG_FORMS = ("sublayer", "block")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GrowthSpec:
    """A growth of a trained model. Sizes left at None stay as they are.

    mode 'exact': function-preserving operators (docs/growth_math.md): hidden zero padding with the RMSNorm scale and
      eps correction, or k-fold duplication (+ zero padding of the remainder); new FFN units / heads with zeroed
      output weights, or duplicated units split between copies; new layers copied with zeroed output
      projections. 'msg': Masked Structural Growth: new structure keeps random weights and is multiplied by a mask
      that ramps 0 -> 1 over `ramp_steps` of the next run (`msg_form` says where the masks apply).
    The μP base shape is kept (the grown model's width multipliers are a fresh model's); `readout` says what happens
    to the logit multiplier. gin/growth/ ships the recipe that won experiments/growth_ablations.py (docs/growth.md):
    layer_strategy 'distance' and new_moments 'zero'; the code defaults are the plain MSG recipe it was compared with.
    """

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_hidden_layers: int | None = None
    vocab_size: int | None = None
    mode: str = "msg"
    hidden_method: str = "new"
    ffn_method: str = "new"
    heads_method: str = "new"
    layer_strategy: str = "even"
    distance_prefer: str = "low"  # distance strategy: duplicate the layers that change the hidden state least
    duplicate_noise: float = 0.0  # zero-sum noise on duplicated readers (breaks symmetry, keeps the function)
    new_moments: str = "mean"  # second moment of new entries: mean of the tensor's old v, or zero
    ramp_steps: int = 100  # MSG: steps of the next run over which masks go 0 -> 1
    msg_form: str = "sublayer"  # see MSG_FORMS
    readout: str = "mup"  # see READOUT_RULES
    seed: int = 0
    tolerance: float = 1e-3  # refuse to write when max |Δlogit| on the probe batch exceeds this
    expect_source: dict | None = None  # e.g. {"hidden_size": 256}: refuse a source checkpoint of another shape

    def __post_init__(self):
        check_field_types(self)
        checks = (
            ("mode", MODES),
            ("hidden_method", WIDTH_METHODS),
            ("ffn_method", WIDTH_METHODS),
            ("heads_method", WIDTH_METHODS),
            ("layer_strategy", LAYER_STRATEGIES),
            ("new_moments", NEW_MOMENT_POLICIES),
            ("distance_prefer", ("low", "high")),
            ("msg_form", MSG_FORMS),
            ("readout", READOUT_RULES),
        )
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"GrowthSpec.{name}={getattr(self, name)!r} is not one of {allowed}.")
        if self.mode == "msg" and "duplicate" in (self.hidden_method, self.ffn_method, self.heads_method):
            raise ConfigError("GrowthSpec: MSG mode grows with new, masked units; use mode='exact' to duplicate.")
        if self.ramp_steps < 1:
            raise ConfigError("GrowthSpec.ramp_steps must be >= 1.")


def target_config(src: TeleFLMConfig, spec: GrowthSpec) -> TeleFLMConfig:
    """The grown model's config; raises ConfigError for shrinking, a head_dim change or broken kv groups."""
    for name, value in (spec.expect_source or {}).items():
        if getattr(src, name) != value:
            raise ConfigError(
                f"The source checkpoint has {name}={getattr(src, name)} but this growth expects "
                f"{value} (GrowthSpec.expect_source): it was written for another model. Grow the "
                "checkpoint it was written for, or fix the growth gin file."
            )
    d, D = src.hidden_size, spec.hidden_size or src.hidden_size
    H = spec.num_attention_heads or src.num_attention_heads
    sizes = {
        "hidden_size": D,
        "intermediate_size": spec.intermediate_size or src.intermediate_size,
        "num_attention_heads": H,
        "num_hidden_layers": spec.num_hidden_layers or src.num_hidden_layers,
        "vocab_size": spec.vocab_size or src.vocab_size,
    }
    for name, new in sizes.items():
        if new < getattr(src, name):
            raise ConfigError(
                f"GrowthSpec.{name}={new} is smaller than the source's {getattr(src, name)}: growth "
                "never shrinks a model. Choose a size >= the source's."
            )
    if D % H or D // H != src.head_dim:
        raise ConfigError(
            f"Growing to hidden_size={D} with num_attention_heads={H} changes head_dim from "
            f"{src.head_dim} to {D / H:g}; growth keeps head_dim fixed (RoPE and the attention "
            f"scale of the old heads would change). Set num_attention_heads = hidden_size / "
            f"{src.head_dim}."
        )
    group = src.num_attention_heads // src.num_key_value_heads
    if H % group:
        raise ConfigError(
            f"num_attention_heads={H} breaks the kv groups of {group} query heads; grow heads by a multiple of {group}."
        )
    for name, method in (("intermediate_size", spec.ffn_method), ("num_attention_heads", spec.heads_method)):
        if method == "duplicate" and sizes[name] % getattr(src, name):
            raise ConfigError(f"{name}: duplication needs a multiple of the source's {getattr(src, name)}.")
    updates = dict(sizes, num_key_value_heads=H // group)
    # The μP base shape stays: the width multipliers (fan-in / base fan-in) grow with the model.
    updates["mup_base_hidden_size"] = src.mup_base_hidden_size or src.hidden_size
    updates["mup_base_intermediate_size"] = src.mup_base_intermediate_size or src.intermediate_size
    if src.use_mup and spec.readout == "mup":
        updates["mup_scale_factor"] = src.mup_scale_factor * D / d
    if spec.mode == "exact" and D != d:
        k = D // d if spec.hidden_method == "duplicate" else 1
        rho_sq = k * d / D  # ms(P x) = rho^2 ms(x): k copies then zero padding (docs/growth_math.md)
        updates["rms_norm_eps"] = src.rms_norm_eps * rho_sq
        updates["rms_norm_scale"] = src.rms_norm_scale * rho_sq**0.5
    return src.replace(**updates)
