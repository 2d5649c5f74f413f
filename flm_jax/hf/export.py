"""Export a checkpoint to a Hugging Face folder (the library behind `python -m flm_jax.export`).

  --format=llama    LlamaForCausalLM with μP multipliers folded into the weights; loads with no custom code.
  --format=teleflm  the released TeleFLM layout: weights as trained, multipliers in config.json.
  --dtype=float32|bfloat16, --step=N (default: latest), --max_shard_size=5GB (sharded with an index past it).

The checkpoint is streamed a layer at a time (flm_jax/training/checkpoint_reader.py) into safetensors files written
tensor by tensor (flm_jax/hf/weights.py), so host memory holds about one layer plus the embedding or the head at any
moment. The files are staged in a private folder and moved into the output folder once all are complete, so a
failed export (a damaged checkpoint) changes nothing. A checkpoint in the middle of a growth mask ramp is refused.
Several processes (jax.distributed) export together: each reads and writes only the safetensors files numbered
process, process + count, ... (so shard the export with --max_shard_size for them all to work); once all are in
place, process 0 writes the index, tokenizer and config.json, the file that makes the folder a model.
See docs/export.md.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable

import jax
import numpy as np
from etils import epath

from flm_jax.config import ConfigError
from flm_jax.files import atomic_write_text, check_output_folder, staged_folder
from flm_jax.growth.fold import plain_source
from flm_jax.hf.layout import (
    FORMATS,
    LAYER_TENSORS,
    LLAMA,
    LM_HEAD,
    Tensor,
    fold_factor,
    generation_config,
    hf_order,
    llama_config,
    teleflm_config,
)
from flm_jax.hf.tokenizer import default_tokenizer_path, save_tokenizer
from flm_jax.hf.weights import INDEX_FILE, SAFETENSORS_DTYPES, SafetensorsWriter, parse_size
from flm_jax.multihost import barrier
from flm_jax.paths import PathLike, as_path
from flm_jax.training.checkpoint_reader import CheckpointReader, ParamSource

DEFAULT_MAX_SHARD_SIZE = "5GB"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far: VmHWM where /proc has it (getrusage's maxrss also counts a
    forking parent's memory), else ru_maxrss (KiB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            status = f.read()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hf_tensor(source: ParamSource, tensor: Tensor, layer: int | None, fmt: str) -> np.ndarray:
    x = source.read(tensor.path) if layer is None else source.read_layer(tensor.path, layer)
    factor = fold_factor(tensor, source.config, fmt)
    if factor != 1.0:  # fold in float32, as the forward pass multiplies
        x = x.astype(np.float32) * np.float32(factor)
    return tensor.to_hf(x)


def _check_out(out: epath.Path, overwrite: bool) -> None:
    check_output_folder(out, "--out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its model files.")


def _remove_stale(out: epath.Path, files: list[str]) -> None:
    """Model files of an earlier export that this one does not replace (another sharding)."""
    for p in [*out.glob("*.safetensors"), out / INDEX_FILE]:
        if p.name not in files and p.exists():
            p.unlink()


def export(
    workdir: PathLike,
    out: PathLike,
    fmt: str = LLAMA,
    dtype: str = "float32",
    step: int | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    tokenizer: PathLike | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] = print,
) -> dict:
    """Write the Hugging Face folder; returns a summary (files, bytes, seconds, peak RSS)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is not one of {FORMATS}")
    if dtype not in SAFETENSORS_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(SAFETENSORS_DTYPES)}")
    max_shard_bytes = parse_size(max_shard_size)
    if tokenizer not in (None, "none") and not as_path(tokenizer).is_file():
        raise FileNotFoundError(f"--tokenizer {tokenizer} not found: pass a SentencePiece model, or none to skip it.")
    out = as_path(out)
    _check_out(out, overwrite)
    process, count = jax.process_index(), jax.process_count()
    barrier("flm_jax.export: output checked")  # before any process writes into it
    start = time.time()
    reader = CheckpointReader(workdir, step)
    source = plain_source(reader)
    config = source.config

    order = hf_order(config.num_hidden_layers)
    specs = []
    for tensor, layer in order:
        shape = source.shape(tensor.path)
        specs.append((tensor.name(layer), tensor.hf_shape(shape[1:] if tensor.stacked else shape)))
    slow = [t for t in LAYER_TENSORS if len(reader.shape(t.path)) > 1 and not reader.layer_chunked(t.path)]
    if slow:
        progress(
            f"warning: {len(slow)} stacked arrays are not stored one layer per chunk; each layer read "
            "decompresses the whole array (re-save the checkpoint with flm_jax.training.checkpoint to stream)."
        )
    # The weights are written into a staging folder and moved into `out` only once complete: a failure part-way (a
    # damaged checkpoint) leaves `out` as it was.
    with staged_folder(out) as stage:
        writer = SafetensorsWriter(stage, specs, dtype, max_shard_bytes, process, count)
        progress(
            f"exporting step {reader.step} of {workdir} as {fmt} {dtype} into {out} "
            f"({len(writer.files)} file{'s' if len(writer.files) > 1 else ''}"
            + (f", {len(writer.mine)} of them by this process of {count})" if count > 1 else ")")
        )
        for tensor, layer in order:
            if writer.wants(tensor.name(layer)):
                writer.write(tensor.name(layer), _hf_tensor(source, tensor, layer, fmt))
            if tensor is LAYER_TENSORS[-1] or tensor is LM_HEAD:  # a layer (or the head) is complete
                done = "head" if tensor is LM_HEAD else f"layer {layer + 1}/{config.num_hidden_layers}"
                progress(f"  {done} written  {time.time() - start:6.1f} s  peak RSS {peak_rss_mib():7.0f} MiB")
        writer.close()
    barrier("flm_jax.export: weights written")
    files = writer.files
    if process == 0:
        _remove_stale(out, files)
        index = writer.index()
        if index is not None:
            atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        with staged_folder(out) as stage:
            if tokenizer != "none":  # before config.json, which AutoTokenizer would read (TeleFLM is unknown to it)
                save_tokenizer(stage, tokenizer or default_tokenizer_path(), config)
            make_config = llama_config if fmt == LLAMA else teleflm_config
            (stage / "config.json").write_text(json.dumps(make_config(config, dtype), indent=2) + "\n")
            (stage / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    barrier("flm_jax.export: done")
    summary = {
        "out": str(out),
        "format": fmt,
        "dtype": dtype,
        "step": reader.step,
        "files": files,
        "bytes": sum((out / f).stat().length for f in files),
        "seconds": time.time() - start,
        "peak_rss_mib": peak_rss_mib(),
    }
    progress(
        f"done in {summary['seconds']:.1f} s: {summary['bytes'] / 2**20:.1f} MiB in {len(files)} file(s), "
        f"peak RSS {summary['peak_rss_mib']:.0f} MiB"
    )
    return summary
