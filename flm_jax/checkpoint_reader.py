"""Read parameters out of a flm_jax orbax checkpoint a layer at a time, without restoring the train state.

orbax restores whole leaves only, so this goes under it: each leaf of the 'state' item is a zarr array in the
step's OCDBT key-value store, named by its tree path joined with '.' (e.g. 'params.layers.self_attn.q_proj').
tensorstore opens that array and reads `array[i]`; training checkpoints store stacked layer arrays in one-layer
chunks (checkpoint.layer_chunked_save_args), so reading layer i decompresses layer i only.

Growth checkpoints carry their mask state in metadata['growth']. A model in the middle of a mask ramp (0 < m < 1)
is not a plain Llama model and is refused; masks at exactly 1 are the plain model; masks at exactly 0 are folded
into a plain model by the growth package, through the hook described at `plain_source`.
"""

from __future__ import annotations

import importlib
import numbers
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tensorstore as ts

from flm_jax.checkpoint import Checkpointer, checkpoint_dir
from flm_jax.config import TeleFLMConfig
from flm_jax.hf_layout import ALL_TENSORS

TreePath = tuple[str, ...]


class GrowthRampError(ValueError):
    """The checkpoint is mid-way through a growth mask ramp: its function is not a plain model's."""


class ParamSource(Protocol):
    """What export and generate read: a plain model's config and its parameters, whole or a layer at a time
    (shapes of stacked arrays include the leading layer axis)."""

    config: TeleFLMConfig

    def shape(self, path: TreePath) -> tuple[int, ...]: ...

    def read(self, path: TreePath) -> np.ndarray: ...

    def read_layer(self, path: TreePath, layer: int) -> np.ndarray: ...


class CheckpointReader:
    """Parameters of one checkpoint step (default: the latest) of a flm_jax workdir."""

    def __init__(self, workdir: str | Path, step: int | None = None):
        root = checkpoint_dir(workdir)
        if not root.is_dir():
            raise FileNotFoundError(f"{workdir} has no checkpoints/ folder: is it a flm_jax workdir?")
        ckpt = Checkpointer(workdir, async_save=False)
        try:
            steps = ckpt.all_steps()
            if not steps:
                raise FileNotFoundError(f"{root} holds no complete checkpoint.")
            self.step = max(steps) if step is None else step
            if self.step not in steps:
                raise FileNotFoundError(f"{root} has no step {self.step}; it has steps {sorted(steps)}.")
            self.metadata: dict[str, Any] = ckpt.metadata(self.step)
        finally:
            ckpt.close()
        self.config = TeleFLMConfig.from_dict(self.metadata["model_config"])
        self.state_dir = root / str(self.step) / "state"
        if not self.state_dir.is_dir():
            raise FileNotFoundError(f"{self.state_dir} not found (orbax step folder names are expected to be "
                                    "the plain step number).")
        # No cache: a read returns fresh memory and nothing lingers after it is dropped.
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._arrays: dict[TreePath, ts.TensorStore] = {}

    def array(self, path: TreePath) -> ts.TensorStore:
        """The lazily opened tensorstore of params/<path>."""
        if path not in self._arrays:
            spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{self.state_dir}/",
                                                  "path": ".".join(("params",) + path) + "/"}}
            try:
                self._arrays[path] = ts.open(spec, open=True, read=True, context=self._context).result()
            except ValueError as e:
                raise KeyError(f"parameter {'/'.join(path)} not found in {self.state_dir}: {e}") from None
        return self._arrays[path]

    def shape(self, path: TreePath) -> tuple[int, ...]:
        return tuple(self.array(path).shape)

    def layer_chunked(self, path: TreePath) -> bool:
        """True when one layer of a stacked array is stored in chunks of its own (a cheap slice read)."""
        return self.array(path).chunk_layout.read_chunk.shape[0] == 1

    def read(self, path: TreePath) -> np.ndarray:
        return self.array(path).read().result()

    def read_layer(self, path: TreePath, layer: int) -> np.ndarray:
        return self.array(path)[layer].read().result()

def read_params(source: ParamSource) -> dict:
    """The whole parameter tree as nested dicts of numpy arrays (small models: generate, tests)."""
    tree: dict = {}
    for tensor in ALL_TENSORS:
        node = tree
        for key in tensor.path[:-1]:
            node = node.setdefault(key, {})
        node[tensor.path[-1]] = source.read(tensor.path)
    return tree


def growth_masks(metadata: dict[str, Any], step: int) -> list[float]:
    """The mask values of a growth checkpoint at `step` (empty for a plain one). metadata['growth'] holds either
    explicit values ('mask' or 'masks': a number, or a list or dict of numbers) or an MSG ramp
    ('start_step', 'ramp_steps': m = clip((step - start_step) / ramp_steps, 0, 1), as flm_jax.growth.msg)."""
    growth = metadata.get("growth") or {}
    found: list[float] = []

    def collect(value):
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            found.append(float(value))
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)

    for key in ("mask", "masks"):
        collect(growth.get(key))
    if not found and "start_step" in growth and "ramp_steps" in growth:
        ramp = max(float(growth["ramp_steps"]), 1e-9)
        found.append(min(max((step - float(growth["start_step"])) / ramp, 0.0), 1.0))
    return found


def plain_source(reader: CheckpointReader) -> ParamSource:
    """The checkpoint as a plain (mask-free) model; a GrowthRampError for one mid-way through a mask ramp.

    Masks all at 1: the masked model is exactly the plain grown model (GROWTH.md), so the parameters are read as
    they are. Any mask at exactly 0 (and none strictly between): hook for the growth package, which folds the
    masks into an equivalent plain model: `flm_jax.growth.fold_for_export(reader) -> ParamSource` (its `config`,
    and `shape` / `read` / `read_layer` of the folded parameters). Until it exists such checkpoints are refused.
    """
    masks = growth_masks(reader.metadata, reader.step)
    if all(m == 1.0 for m in masks):
        return reader
    ramping = sorted({m for m in masks if 0.0 < m < 1.0})
    if ramping:
        raise GrowthRampError(
            f"checkpoint step {reader.step} is in the middle of a growth mask ramp (mask {ramping}): its function "
            "is neither the source model nor the plain grown model, so it cannot be exported as a plain model. "
            "Export a checkpoint from before the growth, or one from after the ramp has reached mask 1.")
    try:
        fold = importlib.import_module("flm_jax.growth").fold_for_export
    except (ImportError, AttributeError):
        raise GrowthRampError(
            f"checkpoint step {reader.step} carries growth masks at 0; folding them into a plain model needs "
            "flm_jax.growth.fold_for_export, which this installation does not provide yet.") from None
    return fold(reader)
