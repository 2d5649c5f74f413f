"""Read parameters out of a flm_jax orbax checkpoint a layer at a time, without restoring the train state.

orbax restores whole leaves only, so this goes under it: each leaf of the 'state' item is a zarr array in the
step's OCDBT key-value store, named by its tree path joined with '.' (e.g. 'params.layers.self_attn.q_proj').
tensorstore opens that array and reads `array[i]`; training checkpoints store stacked layer arrays in one-layer
chunks (flm_jax/training/checkpoint.py), so reading layer i decompresses layer i only.

A grown checkpoint in the middle of its MSG ramp is not a plain model: `flm_jax.growth.fold.plain_source` turns a
reader into the plain model it computes (or refuses).

`read_train_state` restores a whole small checkpoint instead (parameters and optimizer state) onto one device,
with no gin config and no mesh: what notebooks/inspect_pytrees.ipynb looks at.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax
import numpy as np
import tensorstore as ts

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.optim import OptimizerConfig
from flm_jax.params import boxed_abstract_params
from flm_jax.partitioning import MeshLayout, logical_specs, make_mesh
from flm_jax.paths import PathLike, is_remote
from flm_jax.training.checkpoint import Checkpointer, checkpoint_dir
from flm_jax.training.state import StateSpec, TrainState

TreePath = tuple[str, ...]


class ParamSource(Protocol):
    """What export and generate read: a plain model's config and its parameters, whole or a layer at a time
    (shapes of stacked arrays include the leading layer axis)."""

    config: TeleFLMConfig

    def shape(self, path: TreePath) -> tuple[int, ...]: ...

    def read(self, path: TreePath) -> np.ndarray: ...

    def read_layer(self, path: TreePath, layer: int) -> np.ndarray: ...


class CheckpointReader:
    """Parameters of one checkpoint step (default: the latest) of a flm_jax workdir."""

    def __init__(self, workdir: PathLike, step: int | None = None):
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
                raise FileNotFoundError(
                    f"{root} has no step {self.step}; it has steps {sorted(steps)}: pass one of them as --step."
                )
            self.metadata: dict[str, Any] = ckpt.metadata(self.step)  # a damaged file: ConfigError
            try:
                self.config = TeleFLMConfig.from_dict(self.metadata["model_config"])
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"{root}/{self.step}/metadata holds no valid model config ({type(e).__name__}: {e}); restore the "
                    f"checkpoint from a copy, or pass --step with another of its steps {sorted(steps)}."
                ) from None
        finally:
            ckpt.close()
        self.state_dir = root / str(self.step) / "state"
        if not self.state_dir.is_dir():
            raise FileNotFoundError(
                f"{self.state_dir} not found (orbax step folder names are expected to be the plain step number)."
            )
        # No cache: a read returns fresh memory and nothing lingers after it is dropped.
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._arrays: dict[TreePath, ts.TensorStore] = {}
        self._check_shapes()

    def _check_shapes(self) -> None:
        """The stored parameters must have the shapes of the metadata's model config (checked before any read)."""
        expected = nn.meta.unbox(boxed_abstract_params(self.config))
        wrong = []
        for keys, leaf in jax.tree_util.tree_leaves_with_path(expected):
            path = tuple(str(k.key) for k in keys)
            if self.shape(path) != leaf.shape:
                wrong.append(f"{'/'.join(path)} {list(self.shape(path))} (config: {list(leaf.shape)})")
        if wrong:
            raise ConfigError(
                f"{self.state_dir}: the stored parameters do not match the model config in the checkpoint's "
                f"metadata: {', '.join(wrong)}. The metadata was edited or belongs to another checkpoint; restore the "
                "checkpoint from a copy."
            )

    def _damaged(self, path: TreePath, e: Exception) -> ConfigError:
        return ConfigError(
            f"parameter {'/'.join(path)} cannot be read from {self.state_dir} ({e}): the checkpoint is damaged "
            "(a missing or truncated file). Restore it from a copy, or use another step (--step)."
        )

    def array(self, path: TreePath) -> ts.TensorStore:
        """The lazily opened tensorstore of params/<path>."""
        if path not in self._arrays:
            spec = {
                "driver": "zarr",
                "kvstore": {
                    "driver": "ocdbt",
                    "base": f"{self.state_dir}/" if is_remote(self.state_dir) else f"file://{self.state_dir}/",
                    "path": ".".join(("params",) + path) + "/",
                },
            }
            try:
                self._arrays[path] = ts.open(spec, open=True, read=True, context=self._context).result()
            except ValueError as e:
                raise self._damaged(path, e) from None
        return self._arrays[path]

    def shape(self, path: TreePath) -> tuple[int, ...]:
        return tuple(self.array(path).shape)

    def layer_chunked(self, path: TreePath) -> bool:
        """True when one layer of a stacked array is stored in chunks of its own (a cheap slice read)."""
        return self.array(path).chunk_layout.read_chunk.shape[0] == 1

    def read(self, path: TreePath) -> np.ndarray:
        array = self.array(path)
        try:
            return array.read().result()
        except ValueError as e:
            raise self._damaged(path, e) from None

    def read_layer(self, path: TreePath, layer: int) -> np.ndarray:
        array = self.array(path)
        try:
            return array[layer].read().result()
        except ValueError as e:
            raise self._damaged(path, e) from None


def read_params(source: ParamSource) -> dict:
    """The whole parameter tree as nested dicts of numpy arrays (small models: generate, tests)."""
    abstract = nn.meta.unbox(boxed_abstract_params(source.config))
    return jax.tree_util.tree_map_with_path(lambda path, _: source.read(tuple(str(k.key) for k in path)), abstract)


def read_train_state(workdir: PathLike, step: int | None = None) -> tuple[TeleFLMConfig, TrainState, dict[str, Any]]:
    """(model config, train state {'step', 'params', 'opt_state'}, metadata) of one checkpoint step (default: the
    latest), restored whole onto the default device: no gin config and no mesh needed, the metadata gives the
    shapes. The optimizer's settings never change its state's structure (flm_jax/optim.py), so the defaults
    restore any run's moments. Small models only: every array lands on that one device."""
    reader = CheckpointReader(workdir, step)  # checks the folder and the step, reads the metadata
    device = jax.devices()[0]
    layout = MeshLayout(mesh_shape={"data": 1}, rules=())  # explicit: gin bindings in the process never apply
    spec = StateSpec.build(reader.config, OptimizerConfig(), make_mesh(layout, [device]), layout, reader.step + 1)
    on_device = jax.sharding.SingleDeviceSharding(device)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device), spec.abstract
    )
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        state, _, metadata = ckpt.restore(reader.step, abstract)
    finally:
        ckpt.close()
    return reader.config, state, metadata


def param_logical_axes(config: TeleFLMConfig) -> Any:
    """Each parameter's logical axis names as a PartitionSpec (e.g. PartitionSpec('layers', 'embed', 'heads',
    'head_dim')), in the parameter tree's structure; Adam's mu and nu have the same tree and axes."""
    return logical_specs(boxed_abstract_params(config))
