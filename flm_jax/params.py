"""Building parameter trees: abstractly (no memory), their mesh shardings, and sharded initialisation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from flm_jax.config import TeleFLMConfig
from flm_jax.model import TeleFLM, init_inputs
from flm_jax.partitioning import MeshLayout, mesh_shardings


def boxed_abstract_params(config: TeleFLMConfig) -> Any:
    """eval_shape of the model's init: ShapeDtypeStructs still wrapped in their logical-axis metadata."""
    model = TeleFLM(config)
    return jax.eval_shape(lambda rng: model.init(rng, init_inputs())["params"], jax.random.key(0))


def param_shardings(config: TeleFLMConfig, mesh, layout: MeshLayout) -> Any:
    """NamedShardings for the (unboxed) parameter tree on `mesh` (concrete or abstract)."""
    with nn.logical_axis_rules(layout.flax_rules()):
        return mesh_shardings(boxed_abstract_params(config), mesh, layout)


def init_params(config: TeleFLMConfig, mesh, layout: MeshLayout, rng: jax.Array) -> Any:
    """Initialise parameters directly into their shards: each device builds only its slice."""
    model = TeleFLM(config)
    shardings = param_shardings(config, mesh, layout)

    def init(rng):
        return nn.meta.unbox(model.init(rng, init_inputs())["params"])

    with jax.set_mesh(mesh), nn.logical_axis_rules(layout.flax_rules()):
        return jax.jit(init, out_shardings=shardings)(rng)


def count_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.meta.unbox(tree)))
