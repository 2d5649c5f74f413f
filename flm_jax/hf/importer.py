"""Import Hugging Face weights into a flm_jax workdir (the library behind `python -m flm_jax.import_hf`).

Reads a Llama-layout or TeleFLM-layout folder (safetensors, sharded or not; `.bin` only through
`torch.load(weights_only=True)`) and writes DIR/checkpoints/0 (params, a fresh optimizer state, an empty data
state, self-describing metadata) and DIR/config.gin, so `python -m flm_jax.train --workdir=DIR` continues from it.

μP multipliers:
  teleflm  config.json carries use_mup, input_mult, output_mult, mup_scale_factor; weights are taken as they are.
           The μP base shape is read from config.json where flm_jax wrote it; a released config has none and gets
           the release convention (flm_jax.hf.layout.TELEFLM_RELEASE_MUP_BASE, docs/mup.md).
  llama    a plain Llama folder becomes a use_mup=False model with its weights as they are. A folder written by
           `flm_jax.export --format=llama` records the multipliers it folded (config.json 'flm_jax_folded_mup'):
           they are unfolded (embedding / input_mult, head / (output_mult / mup_scale_factor)), giving back the μP
           model. --use_mup=true|false and --input_mult/--output_mult/--mup_scale_factor override that.
Tensors missing from the folder, of the wrong shape, or unknown to the architecture are named in the error.
Runtime settings (TeleFLMConfig.dtype, param_dtype, remat_policy, attention_impl) and the mesh layout are
arguments (the command line takes them from --gin_file/--gin.X).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.files import check_output_folder
from flm_jax.hf.layout import (
    EMBED,
    FOLDED_MUP_KEY,
    IGNORED_HF_SUFFIXES,
    LM_HEAD,
    MUP_FIELDS,
    TELEFLM,
    TELEFLM_RELEASE_MUP_BASE,
    Tensor,
    config_from_hf,
    fold_factor,
    hf_format,
    hf_order,
)
from flm_jax.hf.weights import HFWeights
from flm_jax.optim import OptimizerConfig
from flm_jax.params import boxed_abstract_params
from flm_jax.partitioning import MeshLayout, make_mesh
from flm_jax.paths import PathLike, as_path
from flm_jax.training.checkpoint import Checkpointer, checkpoint_dir, make_metadata
from flm_jax.training.state import StateSpec, init_state

MAX_NAMED = 12  # tensors listed per kind of problem in an error


class HFImportError(ConfigError):
    """The folder does not hold the tensors the config describes; the message names them."""


def resolve_mup(hf: dict[str, Any], fmt: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The μP fields of the imported model (see the module docstring)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    defaults = {"use_mup": False, "input_mult": 1.0, "output_mult": 1.0, "mup_scale_factor": 1.0}
    if fmt == TELEFLM:
        if overrides:
            raise ConfigError(f"a TeleFLM folder carries its own μP fields; drop {sorted(overrides)}.")
        return {**defaults, "use_mup": True, **TELEFLM_RELEASE_MUP_BASE, **{k: hf[k] for k in MUP_FIELDS if k in hf}}
    recorded = {k: v for k, v in (hf.get(FOLDED_MUP_KEY) or {}).items() if k in MUP_FIELDS}
    return {**defaults, **recorded, **overrides}


def expected_tensors(config: TeleFLMConfig) -> list[tuple[Tensor, int | None, tuple[int, ...]]]:
    """(tensor, layer, flm_jax shape of one layer) in file order, shapes from the model's own init."""
    abstract = nn.meta.unbox(boxed_abstract_params(config))

    def shape(path):
        node = abstract
        for key in path:
            node = node[key]
        return tuple(node.shape[1:] if path[0] == "layers" else node.shape)

    return [(t, i, shape(t.path)) for t, i in hf_order(config.num_hidden_layers)]


def check_tensors(weights: HFWeights, expected, tied: bool) -> None:
    """Raise HFImportError naming every missing, misshapen or unknown tensor."""
    present = set(weights.names())
    missing, misshapen = [], []
    for tensor, layer, flm_shape in expected:
        name = tensor.name(layer)
        if name not in present:
            if not (tied and tensor is LM_HEAD):
                missing.append(name)
        elif weights.shape(name) != tensor.hf_shape(flm_shape):
            misshapen.append(f"{name} {list(weights.shape(name))} (expected {list(tensor.hf_shape(flm_shape))})")
    known = {t.name(i) for t, i, _ in expected}
    unknown = sorted(n for n in present - known if not n.endswith(IGNORED_HF_SUFFIXES))
    problems = [
        f"{label}: {', '.join(names[:MAX_NAMED])}"
        + (f" (+{len(names) - MAX_NAMED} more)" if len(names) > MAX_NAMED else "")
        for label, names in (("missing", missing), ("wrong shape", misshapen), ("unexpected", unknown))
        if names
    ]
    if problems:
        raise HFImportError(f"{weights.dir} does not match its config.json: " + "; ".join(problems))


def read_params(weights: HFWeights, expected, config: TeleFLMConfig, fmt: str, tied: bool) -> dict:
    """Nested dicts of numpy arrays in flm_jax layout (stacked layers), multipliers unfolded, in param_dtype."""
    dtype = np.dtype(jnp.dtype(config.param_dtype))
    tree: dict = {}
    for tensor, layer, flm_shape in expected:
        name = tensor.name(layer)
        if tied and tensor is LM_HEAD and name not in weights.file_of:
            name = EMBED.name()  # tied embeddings: the head starts as an untied copy
        w = weights.read(name)
        factor = fold_factor(tensor, config, fmt)
        if factor != 1.0:
            w = w.astype(np.float32) / np.float32(factor)
        x = tensor.from_hf(w, flm_shape).astype(dtype)
        node = tree
        for key in tensor.path[:-1]:
            node = node.setdefault(key, {})
        if layer is None:
            node[tensor.path[-1]] = x
        else:
            if layer == 0:
                node[tensor.path[-1]] = np.empty((config.num_hidden_layers,) + x.shape, dtype)
            node[tensor.path[-1]][layer] = x
    return tree


def sharded_params(model: HFFolder, shardings: Any) -> dict:
    """The parameters as global arrays with `shardings`, each device's block read from the folder alone (so a
    process reads only the rows and columns of each tensor that its devices hold, layer by layer)."""
    dtype = np.dtype(jnp.dtype(model.config.param_dtype))
    num_layers = model.config.num_hidden_layers

    def block(tensor: Tensor, layer: int | None, flm_shape, idx) -> np.ndarray:
        name = tensor.name(layer)
        if model.tied and tensor is LM_HEAD and name not in model.weights.file_of:
            name = EMBED.name()  # tied embeddings: the head starts as an untied copy
        x = tensor.block_from_hf(lambda index: model.weights.read(name, index), flm_shape, idx)
        factor = fold_factor(tensor, model.config, model.format)
        if factor != 1.0:
            x = x.astype(np.float32) / np.float32(factor)
        return x.astype(dtype)

    def leaf(tensor: Tensor, flm_shape, sharding) -> jax.Array:
        if tensor.path[0] != "layers":
            return jax.make_array_from_callback(flm_shape, sharding, lambda idx: block(tensor, None, flm_shape, idx))

        def layers(idx):
            return np.stack([block(tensor, i, flm_shape, idx[1:]) for i in range(*idx[0].indices(num_layers))])

        return jax.make_array_from_callback((num_layers, *flm_shape), sharding, layers)

    tree: dict = {}
    for tensor, layer, flm_shape in expected_tensors(model.config):
        if layer not in (None, 0):
            continue
        node, node_shardings = tree, shardings
        for key in tensor.path[:-1]:
            node, node_shardings = node.setdefault(key, {}), node_shardings[key]
        node[tensor.path[-1]] = leaf(tensor, flm_shape, node_shardings[tensor.path[-1]])
    return tree


class HFModel(NamedTuple):
    """A Hugging Face folder read into flm_jax's layout."""

    config: TeleFLMConfig
    params: dict  # nested dicts of numpy arrays (stacked layers), multipliers unfolded, in param_dtype
    format: str  # LLAMA or TELEFLM
    weights_kind: str  # "safetensors" or "bin"


class HFFolder(NamedTuple):
    """A Hugging Face folder, checked, its tensors not read yet."""

    config: TeleFLMConfig
    weights: HFWeights
    format: str  # LLAMA or TELEFLM
    tied: bool  # tie_word_embeddings


def open_hf(
    hf_dir: PathLike,
    runtime: dict[str, Any] | None = None,
    use_mup: bool | None = None,
    input_mult: float | None = None,
    output_mult: float | None = None,
    mup_scale_factor: float | None = None,
) -> HFFolder:
    """The folder's model config and its (checked) tensors. `runtime` sets TeleFLMConfig's runtime fields
    (config.RUNTIME_FIELDS); the rest comes from config.json (see the module docstring for the μP fields)."""
    hf_dir = as_path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: is it a Hugging Face model folder?")
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise HFImportError(f"{hf_dir}/config.json is not valid JSON ({e}); fix it or download it again.") from None
    fmt = hf_format(hf)
    overrides = {
        "use_mup": use_mup,
        "input_mult": input_mult,
        "output_mult": output_mult,
        "mup_scale_factor": mup_scale_factor,
    }
    config = config_from_hf(hf, resolve_mup(hf, fmt, overrides), runtime or {})
    tied = bool(hf.get("tie_word_embeddings", False))
    weights = HFWeights(hf_dir)
    check_tensors(weights, expected_tensors(config), tied)
    return HFFolder(config, weights, fmt, tied)


def read_hf(hf_dir: PathLike, *args, **kwargs) -> HFModel:
    """The folder's model config and all its parameters as numpy arrays (open_hf's arguments)."""
    folder = open_hf(hf_dir, *args, **kwargs)
    params = read_params(folder.weights, expected_tensors(folder.config), folder.config, folder.format, folder.tied)
    return HFModel(folder.config, params, folder.format, folder.weights.kind)


def import_hf(
    hf_dir: PathLike,
    workdir: PathLike,
    layout: MeshLayout,
    runtime: dict[str, Any] | None = None,
    use_mup: bool | None = None,
    input_mult: float | None = None,
    output_mult: float | None = None,
    mup_scale_factor: float | None = None,
) -> TeleFLMConfig:
    """Write a step-0 flm_jax checkpoint of the Hugging Face folder into workdir (open_hf's arguments); returns
    the model config. Every process reads only the blocks of the tensors its devices hold."""
    hf_dir, workdir = as_path(hf_dir), as_path(workdir)
    check_output_folder(workdir, "--workdir")
    if checkpoint_dir(workdir).is_dir() and any(checkpoint_dir(workdir).iterdir()):
        raise FileExistsError(f"{workdir} already holds checkpoints; import into a new workdir.")
    folder = open_hf(hf_dir, runtime, use_mup, input_mult, output_mult, mup_scale_factor)
    config, fmt, kind = folder.config, folder.format, folder.weights.kind
    mesh = make_mesh(layout)
    # Only the state's structure matters (a fresh optimizer state); the next run builds its own optimizer.
    spec = StateSpec.build(config, OptimizerConfig(), mesh, layout, total_steps=1)
    params = sharded_params(folder, spec.shardings["params"])
    state = init_state(params, spec.tx, spec.shardings)
    metadata = make_metadata(config, imported_from={"hf_dir": str(hf_dir), "format": fmt, "weights": kind})
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(0, state, {}, metadata, force=True)
    ckpt.wait()
    ckpt.close()
    return config
