"""Import Hugging Face weights: `python -m flm_jax.import_hf --hf_dir=HF_DIR --workdir=DIR`.

Reads a Llama-layout or TeleFLM-layout folder (safetensors, sharded or not; `.bin` only through
`torch.load(weights_only=True)`) and writes DIR/checkpoints/0 (params, a fresh optimizer state, an empty data
state, self-describing metadata) and DIR/config.gin, so `python -m flm_jax.train --workdir=DIR` continues from it.

μP multipliers:
  teleflm  config.json carries use_mup, input_mult, output_mult, mup_scale_factor; weights are taken as they are.
  llama    a plain Llama folder becomes a use_mup=False model with its weights as they are. A folder written by
           `flm_jax.export --format=llama` records the multipliers it folded (config.json 'flm_jax_folded_mup'):
           they are unfolded (embedding / input_mult, head / (output_mult / mup_scale_factor)), giving back the μP
           model. --use_mup=true|false and --input_mult/--output_mult/--mup_scale_factor override that.
Tensors missing from the folder, of the wrong shape, or unknown to the architecture are named in the error.
Runtime settings (TeleFLMConfig.dtype, param_dtype, remat_policy) and the mesh come from --gin_file/--gin.X.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from flm_jax import cli
from flm_jax.checkpoint import Checkpointer, checkpoint_dir, make_metadata
from flm_jax.config import RUNTIME_FIELDS, ConfigError, TeleFLMConfig
from flm_jax.hf_layout import (EMBED, FOLDED_MUP_KEY, IGNORED_HF_SUFFIXES, LM_HEAD, MUP_FIELDS, TELEFLM, Tensor,
                               config_from_hf, fold_factor, hf_format, hf_order)
from flm_jax.hf_weights import HFWeights

MAX_NAMED = 12  # tensors listed per kind of problem in an error


class HFImportError(ValueError):
    """The folder does not hold the tensors the config describes; the message names them."""


def resolve_mup(hf: dict[str, Any], fmt: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The μP fields of the imported model (see the module docstring)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    defaults = {"use_mup": False, "input_mult": 1.0, "output_mult": 1.0, "mup_scale_factor": 1.0}
    if fmt == TELEFLM:
        if overrides:
            raise ConfigError(f"a TeleFLM folder carries its own μP fields; drop {sorted(overrides)}.")
        return {**defaults, "use_mup": True, **{k: hf[k] for k in MUP_FIELDS if k in hf}}
    recorded = {k: v for k, v in (hf.get(FOLDED_MUP_KEY) or {}).items() if k in MUP_FIELDS}
    return {**defaults, **recorded, **overrides}


def expected_tensors(config: TeleFLMConfig) -> list[tuple[Tensor, int | None, tuple[int, ...]]]:
    """(tensor, layer, flm_jax shape of one layer) in file order, shapes from the model's own init."""
    import flax.linen as nn

    from flm_jax.params import boxed_abstract_params

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
    problems = [f"{label}: {', '.join(names[:MAX_NAMED])}" + (f" (+{len(names) - MAX_NAMED} more)"
                                                              if len(names) > MAX_NAMED else "")
                for label, names in (("missing", missing), ("wrong shape", misshapen), ("unexpected", unknown))
                if names]
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


def config_gin(config: TeleFLMConfig, hf_dir: Path) -> str:
    """The operative gin bindings (mesh, optimizer, ...) followed by the imported model's TeleFLMConfig."""
    other = [line for line in gin.config_str().splitlines() if not line.startswith("TeleFLMConfig.")]
    model = [f"TeleFLMConfig.{k} = {v!r}" for k, v in config.to_dict().items()]
    return "\n".join([f"# Written by flm_jax.import_hf from {hf_dir}.", *other, "", *model]) + "\n"


def import_hf(hf_dir: str | Path, workdir: str | Path, use_mup: bool | None = None, input_mult: float | None = None,
              output_mult: float | None = None, mup_scale_factor: float | None = None, layout=None) -> TeleFLMConfig:
    """Write a step-0 flm_jax checkpoint of the Hugging Face folder into workdir; returns the model config."""
    from flm_jax.partitioning import MeshLayout, make_mesh
    from flm_jax.train import StateSpec
    from flm_jax.train_state import init_state

    hf_dir, workdir = Path(hf_dir), Path(workdir)
    if checkpoint_dir(workdir).is_dir() and any(checkpoint_dir(workdir).iterdir()):
        raise FileExistsError(f"{workdir} already holds checkpoints; import into a new workdir.")
    hf = json.loads((hf_dir / "config.json").read_text())
    fmt = hf_format(hf)
    mup = resolve_mup(hf, fmt, {"use_mup": use_mup, "input_mult": input_mult, "output_mult": output_mult,
                                "mup_scale_factor": mup_scale_factor})
    defaults = TeleFLMConfig()  # gin-bound runtime settings
    config = config_from_hf(hf, mup, {k: getattr(defaults, k) for k in RUNTIME_FIELDS})
    tied = bool(hf.get("tie_word_embeddings", False))
    weights = HFWeights(hf_dir)
    expected = expected_tensors(config)
    check_tensors(weights, expected, tied)
    params_np = read_params(weights, expected, config, fmt, tied)

    layout = layout or MeshLayout()
    mesh = make_mesh(layout)
    spec = StateSpec.build(config, mesh, layout, total_steps=1)
    params = jax.tree_util.tree_map(
        lambda x, sharding: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]),
        params_np, spec.shardings["params"])
    del params_np
    state = init_state(params, spec.tx, spec.shardings)
    metadata = make_metadata(config, imported_from={"hf_dir": str(hf_dir.resolve()), "format": fmt,
                                                    "weights": weights.kind})
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(0, state, {}, metadata, force=True)
    ckpt.wait()
    ckpt.close()
    if jax.process_index() == 0:
        (workdir / "config.gin").write_text(config_gin(config, hf_dir))
    return config


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--hf_dir", required=True, help="Hugging Face folder (config.json + weights)")
    p.add_argument("--workdir", required=True, help="new flm_jax workdir to write")
    p.add_argument("--use_mup", type=_bool, default=None,
                   help="llama layout: true unfolds μP multipliers, false keeps a plain model "
                        "(default: what config.json records)")
    p.add_argument("--input_mult", type=float, default=None)
    p.add_argument("--output_mult", type=float, default=None)
    p.add_argument("--mup_scale_factor", type=float, default=None)
    cli.add_distributed_flags(p)
    args = cli.parse(p, argv)
    cli.init_distributed(args)
    try:
        config = import_hf(args.hf_dir, args.workdir, args.use_mup, args.input_mult, args.output_mult,
                           args.mup_scale_factor)
    except (HFImportError, ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"import_hf: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"Imported {args.hf_dir} into {args.workdir}/checkpoints/0 ({config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}, use_mup={config.use_mup}).", flush=True)


if __name__ == "__main__":
    main()
