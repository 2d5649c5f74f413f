"""Hugging Face names, shapes and configs of a Tele-FLM model: the one mapping that export and import share.

Two layouts, the same tensor names (the released TeleFLM ones, which are also Llama's):
  llama    LlamaForCausalLM; loads in transformers, vLLM, TGI and llama.cpp's converter with no custom code.
           μP multipliers are folded into the weights (embed_tokens x input_mult, lm_head x output_mult /
           mup_scale_factor); the folded values are recorded under FOLDED_MUP_KEY so an import can unfold them.
  teleflm  the released TeleFLM config (model_type "TeleFLM"): weights as trained, multipliers in the config.
Both fold flm_jax's rms_norm_scale (set by hidden-size growth) into the norm gains.

flm_jax stores per-head projections with split head axes (q_proj [d, h, e], o_proj [h, e, d]); a Hugging Face
Linear weight is [out, in]. `to_hf` flattens the input axes and the output axes and transposes; the rotate-half
RoPE layout is already Hugging Face's, so no permutation of head dimensions is needed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from flm_jax.config import MUP_BASE_FIELDS, SHAPE_FIELDS, ConfigError, TeleFLMConfig

LLAMA, TELEFLM = "llama", "teleflm"
FORMATS = (LLAMA, TELEFLM)
FOLDED_MUP_KEY = "flm_jax_folded_mup"  # llama config.json: the multipliers folded into the weights
# The μP fields an export records: the released config.json fields, then flm_jax's base shape (docs/mup.md).
MUP_FIELDS = ("use_mup", "input_mult", "output_mult", "mup_scale_factor", *MUP_BASE_FIELDS)
# The μP base shape of a released TeleFLM config.json, which records none: width 256 (FLM-101B's proxy width; with it
# mup_scale_factor = hidden_size / 256 for both FLM-2-52B-Instruct, 32, and Tele-FLM-1T, 80) and FFN 682 (the 52B's
# 21824 / 32, the same FFN ratio). An assumption: docs/mup.md says why and how to override it.
TELEFLM_RELEASE_MUP_BASE = {"mup_base_hidden_size": 256.0, "mup_base_intermediate_size": 682.0}
# Buffers that old Llama checkpoints carry and that hold no parameters.
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One parameter: its flm_jax tree path, its Hugging Face name, and how many leading axes are Linear inputs
    (None: stored as is)."""

    path: tuple[str, ...]
    hf_name: str  # '{i}' stands for the layer index
    n_in: int | None

    @property
    def stacked(self) -> bool:
        return self.path[0] == "layers"

    def name(self, layer: int | None = None) -> str:
        return self.hf_name.format(i=layer)

    def hf_shape(self, flm_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The Hugging Face shape of one (layer's) flm_jax array of shape flm_shape."""
        if self.n_in is None:
            return tuple(flm_shape)
        return (math.prod(flm_shape[self.n_in :]), math.prod(flm_shape[: self.n_in]))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.n_in is None:
            return x
        return x.reshape(self.hf_shape(x.shape)[::-1]).T

    def from_hf(self, w: np.ndarray, flm_shape: tuple[int, ...]) -> np.ndarray:
        if self.n_in is None:
            return w.reshape(flm_shape)
        return np.ascontiguousarray(w.T).reshape(flm_shape)

    def block_from_hf(self, read: Callable[[tuple[slice, ...]], np.ndarray], flm_shape, idx) -> np.ndarray:
        """The block `idx` (slices over the dims of one layer's flm_jax array) of this tensor, reading only the
        rows and columns of the Hugging Face matrix that hold it through `read(hf_index)`. A flattened group of
        dims (heads x head_dim) is a contiguous range when only its first dim is cut; otherwise it is read whole
        and cut after the conversion."""
        idx = tuple(idx) + (slice(None),) * (len(flm_shape) - len(idx))
        if self.n_in is None:
            return read(idx)
        groups = [(flm_shape[self.n_in :], idx[self.n_in :]), (flm_shape[: self.n_in], idx[: self.n_in])]
        hf_index, shape, cut = [], [[], []], [[], []]
        for g, (dims, slices) in enumerate(groups):
            bounds = [s.indices(d)[:2] for s, d in zip(slices, dims)]
            if all(b == (0, d) for b, d in zip(bounds[1:], dims[1:])):  # contiguous in the flattened group
                inner = math.prod(dims[1:])
                hf_index.append(slice(bounds[0][0] * inner, bounds[0][1] * inner))
                shape[g] = [bounds[0][1] - bounds[0][0], *dims[1:]]
                cut[g] = [slice(None)] * len(dims)
            else:
                hf_index.append(slice(None))
                shape[g], cut[g] = list(dims), list(slices)
        x = np.ascontiguousarray(read(tuple(hf_index)).T).reshape(shape[1] + shape[0])
        return x[tuple(cut[1] + cut[0])]


_LAYER = "model.layers.{i}."
EMBED = Tensor(("embed_tokens",), "model.embed_tokens.weight", None)
LAYER_TENSORS = (
    Tensor(("layers", "input_layernorm", "scale"), _LAYER + "input_layernorm.weight", None),
    Tensor(("layers", "self_attn", "q_proj"), _LAYER + "self_attn.q_proj.weight", 1),
    Tensor(("layers", "self_attn", "k_proj"), _LAYER + "self_attn.k_proj.weight", 1),
    Tensor(("layers", "self_attn", "v_proj"), _LAYER + "self_attn.v_proj.weight", 1),
    Tensor(("layers", "self_attn", "o_proj"), _LAYER + "self_attn.o_proj.weight", 2),
    Tensor(("layers", "post_attention_layernorm", "scale"), _LAYER + "post_attention_layernorm.weight", None),
    Tensor(("layers", "mlp", "gate_proj"), _LAYER + "mlp.gate_proj.weight", 1),
    Tensor(("layers", "mlp", "up_proj"), _LAYER + "mlp.up_proj.weight", 1),
    Tensor(("layers", "mlp", "down_proj"), _LAYER + "mlp.down_proj.weight", 1),
)
FINAL_NORM = Tensor(("norm", "scale"), "model.norm.weight", None)
LM_HEAD = Tensor(("lm_head",), "lm_head.weight", 1)
ALL_TENSORS = (EMBED, *LAYER_TENSORS, FINAL_NORM, LM_HEAD)


def hf_order(num_layers: int) -> list[tuple[Tensor, int | None]]:
    """(tensor, layer) in file order: embedding, layer 0 ... layer L-1, final norm, head."""
    return (
        [(EMBED, None)]
        + [(t, i) for i in range(num_layers) for t in LAYER_TENSORS]
        + [(FINAL_NORM, None), (LM_HEAD, None)]
    )


NORMS = (LAYER_TENSORS[0], LAYER_TENSORS[5], FINAL_NORM)


def fold_factor(tensor: Tensor, config: TeleFLMConfig, fmt: str) -> float:
    """What export multiplies this tensor by (import divides by it): the forward-pass multipliers that the
    Hugging Face layout has no field for. Norm gains absorb rms_norm_scale (a flm_jax growth extension) in both
    layouts; the llama layout also absorbs the μP multipliers into the embedding and the head."""
    if tensor in NORMS:
        return float(getattr(config, "rms_norm_scale", 1.0))
    if fmt == LLAMA and tensor is EMBED:
        return config.embedding_scale
    if fmt == LLAMA and tensor is LM_HEAD:
        return config.logits_scale
    return 1.0


# --- configs ---


def _common_config(config: TeleFLMConfig, dtype: str) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": False,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # the pre-5 transformers name, read by older serving stacks
    }


def llama_config(config: TeleFLMConfig, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_common_config(config, dtype),
        FOLDED_MUP_KEY: {k: getattr(config, k) for k in MUP_FIELDS},
    }


def teleflm_config(config: TeleFLMConfig, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["TeleFLMForCausalLM"],
        "model_type": "TeleFLM",
        **_common_config(config, dtype),
        **{k: getattr(config, k) for k in MUP_FIELDS},
    }


def generation_config(config: TeleFLMConfig) -> dict[str, Any]:
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


def hf_format(hf_config: dict[str, Any]) -> str:
    model_type = str(hf_config.get("model_type", "")).lower()
    if model_type == "llama":
        return LLAMA
    if model_type == "teleflm":
        return TELEFLM
    raise ConfigError(
        f"config.json has model_type {hf_config.get('model_type')!r} (architectures "
        f"{hf_config.get('architectures')}); import reads 'llama' (LlamaForCausalLM) and 'TeleFLM' folders only: "
        "pass a folder of one of those."
    )


def _rope_theta(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ConfigError(f"config.json asks for RoPE scaling {kind!r}; flm_jax implements plain RoPE only.")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any], mup: dict[str, Any], runtime: dict[str, Any]) -> TeleFLMConfig:
    """TeleFLMConfig of a Hugging Face config.json; `mup` gives the μP fields, `runtime` dtype/remat settings."""
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
    }
    bad = {k: v for k, (v, want) in unsupported.items() if v != want}
    if bad:
        raise ConfigError(f"config.json has {bad}; the Tele-FLM architecture needs silu and no biases.")
    missing = [k for k in SHAPE_FIELDS if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks {missing}, which give the model's shape; add them to it.")
    heads = int(hf["num_attention_heads"])
    config = TeleFLMConfig.from_dict(  # from_dict: a record without the μP base shape reads as it was written
        dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=_rope_theta(hf),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            pad_token_id=_token_id(hf, "pad_token_id", 0),
            bos_token_id=_token_id(hf, "bos_token_id", 1),
            eos_token_id=_token_id(hf, "eos_token_id", 2),
            **mup,
            **runtime,
        )
    )
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != config.head_dim:
        raise ConfigError(
            f"config.json head_dim={head_dim} differs from hidden_size / num_attention_heads = "
            f"{config.head_dim}; flm_jax derives head_dim from those two."
        )
    return config


def _token_id(hf: dict[str, Any], key: str, default: int) -> int:
    value = hf.get(key)
    if isinstance(value, list):  # some configs list several eos ids; the first is the canonical one
        value = value[0] if value else None
    return default if value is None else int(value)
