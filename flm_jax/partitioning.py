"""Logical axis names, mesh layouts and the shardings they imply.

Every parameter and key activation of the model is annotated with *logical* axis names. A `MeshLayout` (one gin
file in gin/meshes/) is a device-mesh shape plus rules mapping logical names to mesh axes; shardings of
parameters, optimizer state and batches are derived from it, T5X/MaxText style.

Logical axes (parameters):   vocab, embed, mlp, heads, kv_heads, head_dim, layers, norm
Logical axes (activations):  act_batch, act_length, act_embed, act_heads, act_kv_heads, act_head_dim, act_mlp,
                             act_vocab
A logical name no rule mentions is replicated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import gin
from flm_jax.config import ConfigError, check_field_types

MESH_AXES = ("data", "fsdp", "tensor")
PARAM_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm")
ACTIVATION_AXES = (
    "act_batch",
    "act_length",
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_head_dim",
    "act_mlp",
    "act_vocab",
)
# The logical axes of a token batch [batch, length].
BATCH_AXES = ("act_batch", "act_length")

Rules = tuple[tuple[str, Any], ...]
# The config field that sets the size of each sharded parameter axis (named in divisibility errors).
AXIS_FIELDS = {
    "vocab": "vocab_size",
    "embed": "hidden_size",
    "mlp": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "layers": "num_hidden_layers",
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """A device mesh over MESH_AXES and the logical-axis rules that use it.

    mesh_shape maps mesh axis -> size; at most one size may be -1 ("all remaining devices"). Axes left out have
    size 1. device_memory_gib is the memory of one accelerator, used by `flm_jax.plan` to say whether a model fits.
    num_devices fixes the device count for planning on an abstract mesh when mesh_shape uses -1. topology names the
    TPU slice the layout is for (a Cloud TPU name such as "v5p-2048", flm_jax.topology): `flm_jax.plan --compile`
    compiles for it unless --topology says otherwise.
    """

    name: str = "single"
    mesh_shape: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": 1})
    rules: Rules = ()
    device_memory_gib: float | None = None
    num_devices: int | None = None
    topology: str | None = None

    def __post_init__(self):
        check_field_types(self)
        unknown = sorted(set(self.mesh_shape) - set(MESH_AXES))
        if unknown:
            raise ConfigError(
                f"MeshLayout {self.name!r}: unknown mesh axis {unknown} in mesh_shape; the mesh axes "
                f"are {MESH_AXES}. Rename the axis in the mesh gin file."
            )
        object.__setattr__(self, "rules", tuple((str(k), _as_mesh_axes(v)) for k, v in self.rules))
        known_logical = set(PARAM_AXES) | set(ACTIVATION_AXES)
        for logical, mesh_axes in self.rules:
            if logical not in known_logical:
                raise ConfigError(
                    f"MeshLayout {self.name!r}: rule for unknown logical axis {logical!r}; logical "
                    f"axes are {sorted(known_logical)}."
                )
            for axis in mesh_axes or ():
                if axis not in MESH_AXES:
                    raise ConfigError(
                        f"MeshLayout {self.name!r}: rule {logical!r} -> {axis!r} names an unknown mesh axis; "
                        f"mesh axes are {MESH_AXES}. Fix MeshLayout.rules in the mesh gin file."
                    )
        if sum(1 for v in self.mesh_shape.values() if v == -1) > 1:
            raise ConfigError(f"MeshLayout {self.name!r}: at most one mesh axis may have size -1.")

    def resolved_shape(self, num_devices: int) -> tuple[int, ...]:
        """Sizes along MESH_AXES for num_devices devices."""
        sizes = [int(self.mesh_shape.get(axis, 1)) for axis in MESH_AXES]
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ConfigError(
                    f"MeshLayout {self.name!r}: {num_devices} devices cannot be split into a mesh "
                    f"{dict(zip(MESH_AXES, sizes))}; the fixed axes need a multiple of {fixed}."
                )
            sizes[sizes.index(-1)] = num_devices // fixed
        elif fixed != num_devices:
            raise ConfigError(
                f"MeshLayout {self.name!r}: mesh {dict(zip(MESH_AXES, sizes))} needs {fixed} devices "
                f"but {num_devices} are available. Set one mesh_shape size to -1 or change the sizes."
            )
        return tuple(sizes)

    def flax_rules(self) -> tuple[tuple[str, Any], ...]:
        return tuple(
            (logical, mesh_axes[0] if mesh_axes and len(mesh_axes) == 1 else mesh_axes)
            for logical, mesh_axes in self.rules
        )


def _as_mesh_axes(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def make_mesh(layout: MeshLayout, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A concrete mesh (implicit 'Auto' axes, as linen's logical constraints need) over the given devices.

    With no devices given, a fully specified mesh smaller than the host uses the first devices it needs.
    """
    if devices is None:
        devices = jax.devices()
        needed = math.prod(layout.mesh_shape.values())
        if 0 < needed < len(devices) and jax.process_count() == 1:  # e.g. 'single' on a multi-device host
            devices = devices[:needed]
    shape = layout.resolved_shape(len(devices))
    # jax.make_mesh orders devices by physical topology (TPU ICI rings, GPUs of one host on the inner axis).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def make_abstract_mesh(layout: MeshLayout, num_devices: int | None = None) -> jax.sharding.AbstractMesh:
    """A device-free mesh for planning; num_devices defaults to the layout's own."""
    num_devices = num_devices or layout.num_devices
    if num_devices is None:
        sizes = [layout.mesh_shape.get(axis, 1) for axis in MESH_AXES]
        if -1 in sizes:
            raise ConfigError(
                f"MeshLayout {layout.name!r} uses -1 and declares no num_devices; planning needs a "
                "device count: set MeshLayout.num_devices or pass one."
            )
        num_devices = math.prod(sizes)
    shape = layout.resolved_shape(num_devices)
    return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_specs(abstract_tree) -> Any:
    """PartitionSpecs of logical names for a tree of (boxed) abstract values, e.g. eval_shape(model.init)."""
    return nn.get_partition_spec(abstract_tree)


def mesh_shardings(abstract_tree, mesh, layout: MeshLayout) -> Any:
    """NamedShardings for every leaf of a boxed abstract tree, after checking that each split divides."""
    specs = logical_specs(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, layout.flax_rules())
    check_divisible(nn.meta.unbox(abstract_tree), shardings, specs)
    return shardings


def check_divisible(abstract_tree, shardings, logical_specs_tree) -> None:
    """Raise a ConfigError naming the first parameter whose dimension its mesh axes do not divide."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
    sharding_leaves = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    spec_leaves = jax.tree_util.tree_leaves(logical_specs_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), sharding, logical in zip(leaves, sharding_leaves, spec_leaves):
        mesh_sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes))
        for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
            axes = _as_mesh_axes(axes) or ()
            split = math.prod(mesh_sizes[a] for a in axes)
            if size % split:
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                logical_name = logical[dim] if dim < len(logical) else None
                raise ConfigError(
                    f"Parameter {name} dimension {dim} (logical axis {logical_name!r}, size {size}) is not "
                    f"divisible by mesh axes {axes} of total size {split}. Make TeleFLMConfig."
                    f"{AXIS_FIELDS.get(logical_name, logical_name)} a multiple of {split}, or use a mesh layout "
                    f"with a smaller {'/'.join(axes)} axis (MeshLayout.mesh_shape)."
                )


def batch_sharding(mesh, layout: MeshLayout) -> NamedSharding:
    """Sharding of a [batch, length] token array."""
    spec = nn.logical_to_mesh_axes(BATCH_AXES, layout.flax_rules())
    return NamedSharding(mesh, spec)


def batch_split(mesh, layout: MeshLayout) -> int:
    """How many ways the batch dimension is split across the mesh (global batch must divide by it)."""
    axis = batch_sharding(mesh, layout).spec[0]
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return math.prod(sizes[a] for a in (_as_mesh_axes(axis) or ()))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(rows: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
    """The global [batch_size, ...] arrays from this process's rows (in global row order; training/input.py
    decides which); no process holds the whole batch."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:])) for k, v in rows.items()}
