"""TeleFLMConfig: the model's shape and numerics, named as in Hugging Face TeleFLM config.json files.

Fields that exist in a released TeleFLM config.json keep its name (flm_jax/hf/layout.py writes them). The shape
fields have no default: a run whose gin files include no model (gin/models/*.gin) stops with an error naming the
missing fields, instead of silently building some default size. The few runtime-only settings (compute/param
dtype, remat policy, attention implementation) are grouped at the end and never exported.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any

import gin

SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
DTYPES = ("float32", "bfloat16", "float16", "float64")
# Which intermediate values a layer keeps for the backward pass (model.checkpoint_policy; plan.py estimates them):
#   none          everything; nothing is recomputed
#   full          only the layer input; the whole layer is recomputed
#   dots          every matmul output, attention scores included
#   minimal       the weight matmuls' outputs (dots without batch dimensions); attention is recomputed
#   save_attn     only the attention output (splash: and its logsumexp, so its forward kernel is not re-run)
#   offload_attn  as save_attn, but kept in pinned host memory instead of device memory
REMAT_POLICIES = ("none", "full", "dots", "minimal", "save_attn", "offload_attn")
# How attention is computed (model.ATTENTION_CORES); all agree to rounding, so any can run any checkpoint:
#   einsum       the reference: float32 scores, a dense mask, softmax
#   lse          einsum's arithmetic, its backward pass recomputing the probabilities from the saved softmax
#                statistics (less memory; the fastest on CPU, so the default)
#   dot_product  jax.nn.dot_product_attention (XLA; it groups kv heads itself)
#   splash       the Pallas splash attention kernel on TPU (interpreted elsewhere: slow, for tests); decoding from a
#                KV cache runs einsum
ATTENTION_IMPLS = ("einsum", "lse", "dot_product", "splash")
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl", "scan_unroll")
MUP_BASE_FIELDS = ("mup_base_hidden_size", "mup_base_intermediate_size")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


# What each annotated type accepts, how a message names it, and an example binding.
_TYPES = {
    bool: (lambda v: isinstance(v, bool), "True or False", "True"),
    int: (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer", "10"),
    float: (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number", "1e-3"),
    str: (lambda v: isinstance(v, str), "a quoted string", "'text'"),
    tuple: (lambda v: isinstance(v, (tuple, list)), "a tuple", "('a', 'b')"),
    dict: (lambda v: isinstance(v, Mapping), "a dict", "{'key': 1}"),
    type(None): (lambda v: v is None, "None", "None"),
}


@functools.cache
def _field_types(cls: type) -> dict[str, tuple]:
    """Each field's accepted types as _TYPES keys (fields of other types are not checked)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds = tuple(typing.get_origin(o) or o for o in options)
        if all(k in _TYPES for k in kinds):
            out[field.name] = kinds
    return out


def check_field_types(config: Any) -> None:
    """Raise ConfigError for a field of the dataclass `config` whose value is not of its annotated type: gin passes
    whatever a binding says (`--gin.TrainConfig.steps='10'` is a string), which would fail far from the binding."""
    cls = type(config).__name__
    for name, kinds in _field_types(type(config)).items():
        value = getattr(config, name)
        if not any(_TYPES[k][0](value) for k in kinds):
            wanted = " or ".join(_TYPES[k][1] for k in kinds)
            raise ConfigError(
                f"{cls}.{name}={value!r} is {type(value).__name__}, not {wanted}: fix the binding in the gin file or "
                f"on the command line, e.g. --gin.{cls}.{name}={_TYPES[kinds[0]][2]}"
            )


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TeleFLMConfig:
    # --- architecture (HF TeleFLM config.json names); the shape is required (a model gin file binds it) ---
    vocab_size: int = gin.REQUIRED
    hidden_size: int = gin.REQUIRED
    intermediate_size: int = gin.REQUIRED
    num_hidden_layers: int = gin.REQUIRED
    num_attention_heads: int = gin.REQUIRED
    num_key_value_heads: int | None = None  # None: plain multi-head attention (kv heads = heads)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    # flm_jax extension (not an HF field; export folds it into the norm gains): a static multiplier on every
    # RMSNorm output, set by exact zero-padding growth of the hidden size (docs/growth_math.md). 1 otherwise.
    rms_norm_scale: float = 1.0
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    # --- μP: multipliers in the forward pass (HF fields) ---
    use_mup: bool = True
    input_mult: float = 1.0  # embedding output x input_mult
    output_mult: float = 1.0  # logits x output_mult / mup_scale_factor: the readout multiplier, nothing else
    mup_scale_factor: float = 1.0
    # --- μP: the base shape (flm_jax fields, docs/mup.md). A matrix's width multiplier is its fan-in over the base
    # model's: hidden_size / mup_base_hidden_size for q/k/v/o/gate/up, intermediate_size /
    # mup_base_intermediate_size for down_proj. It sets hidden init and Adam learning rates; growth keeps the base,
    # so a grown model trains as a fresh one of its shape. None: this model's own size (width multiplier 1).
    mup_base_hidden_size: float | None = None
    mup_base_intermediate_size: float | None = None
    # --- special tokens ---
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    # --- runtime settings (not exported) ---
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    remat_policy: str = "full"  # see REMAT_POLICIES
    attention_impl: str = "lse"  # see ATTENTION_IMPLS
    # Layers per iteration of the scanned stack: 1 compiles in a time independent of depth; unrolling all of them
    # (num_hidden_layers) saves the loop's stacked copies of each layer's residuals (~6% of the CPU bench step).
    scan_unroll: int = 1

    def __post_init__(self):
        check_field_types(self)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        self._validate()

    def _validate(self):
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "scan_unroll",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"TeleFLMConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"TeleFLMConfig.hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; head_dim = hidden_size / num_attention_heads must be an integer. "
                f"Choose num_attention_heads among the divisors of {self.hidden_size} "
                f"(Tele-FLM uses head_dim 128, i.e. num_attention_heads = hidden_size / 128)."
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head_dim={self.head_dim} (hidden_size / num_attention_heads) must be even for "
                "RoPE; change hidden_size or num_attention_heads."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"TeleFLMConfig.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; every kv head must serve a whole group of "
                "query heads. Set num_key_value_heads to a divisor of num_attention_heads (or None for MHA)."
            )
        if self.tie_word_embeddings:
            raise ConfigError(
                "TeleFLMConfig.tie_word_embeddings=True is not supported: Tele-FLM unties the "
                "input embedding and the LM head. Set tie_word_embeddings=False."
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"TeleFLMConfig.{name}={getattr(self, name)!r} is not one of {DTYPES}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"TeleFLMConfig.remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"TeleFLMConfig.attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}; "
                "'einsum' is the reference, 'splash' is for TPUs."
            )
        for name in ("rms_norm_eps", "rms_norm_scale", "rope_theta", "mup_scale_factor"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"TeleFLMConfig.{name} must be > 0, got {getattr(self, name)!r}.")
        for name in MUP_BASE_FIELDS:
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"TeleFLMConfig.{name} must be > 0 (or None: the model's own size).")

    # --- derived values ---
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def logits_scale(self) -> float:
        """Multiplier on the LM head output: output_mult / mup_scale_factor under μP, else 1."""
        return self.output_mult / self.mup_scale_factor if self.use_mup else 1.0

    @property
    def embedding_scale(self) -> float:
        return self.input_mult if self.use_mup else 1.0

    def replace(self, **changes: Any) -> TeleFLMConfig:
        return dataclasses.replace(self, **changes)

    # --- parameter counts ---
    def params_per_layer(self) -> int:
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = h * h * 2 + h * kv * 2  # q, o and k, v
        mlp = 3 * h * self.intermediate_size
        return attention + mlp + 2 * h  # two RMSNorm gains

    def params_embedding(self) -> int:
        return self.vocab_size * self.hidden_size

    def params_total(self) -> int:
        head = self.vocab_size * self.hidden_size
        return self.params_embedding() + self.num_hidden_layers * self.params_per_layer() + self.hidden_size + head

    def params_non_embedding(self) -> int:
        return self.params_total() - self.params_embedding()

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6·N + 12·L·H·Q·T.

        N counts every matmul parameter (the embedding lookup is not a matmul); the second term is the attention
        score and value products at sequence length T (defaults to max_position_embeddings).
        """
        seq_len = seq_len or self.max_position_embeddings
        matmul_params = self.params_non_embedding() - (2 * self.num_hidden_layers + 1) * self.hidden_size
        attention = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6.0 * matmul_params + attention

    # --- (de)serialisation ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TeleFLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown TeleFLMConfig fields {unknown}; known fields are {sorted(known)}.")
        values = dict(values)
        if values.get("use_mup", True) and "mup_base_hidden_size" not in values:
            # Written before the base shape existed, when mup_scale_factor was also every matrix's width
            # multiplier: the base that gives those multipliers back, so old runs resume exactly.
            factor = values.get("mup_scale_factor", 1.0)
            values["mup_base_hidden_size"] = values["hidden_size"] / factor
            values["mup_base_intermediate_size"] = values["intermediate_size"] / factor
        return cls(**values)


def human_count(n: float) -> str:
    """12_345_678_901 -> '12.35B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n)) if float(n).is_integer() else f"{n:.3g}"
