"""Plan a model on a mesh without devices: parameter count and per-device memory (the library behind
`python -m flm_jax.plan`).

Parameters and their shards come from `jax.eval_shape` of the real model on a `jax.sharding.AbstractMesh`, so the
per-device numbers are the shapes the training step would use. Memory per device:
  params      shard elements x param_dtype bytes
  optimizer   AdamW first and second moments in float32 (8 bytes per shard element)
  gradients   shard elements x param_dtype bytes (+ a float32 accumulator when microbatching)
  activations what the backward pass keeps under the remat policy (an estimate, see `activation_bytes`), plus the
              working set of one layer being recomputed and the float32 logits of one microbatch.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flm_jax.config import ConfigError, TeleFLMConfig, human_count
from flm_jax.params import boxed_abstract_params
from flm_jax.partitioning import MeshLayout, batch_split, make_abstract_mesh, mesh_shardings

GIB = 1024**3
ADAM_BYTES_PER_PARAM = 8  # mu and nu in float32


def axis_split(layout: MeshLayout, mesh, logical: str) -> int:
    """How many ways the layout splits a logical axis on this mesh."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    for name, mesh_axes in layout.rules:
        if name == logical:
            return math.prod(sizes[a] for a in (mesh_axes or ()))
    return 1


def activation_bytes(
    cfg: TeleFLMConfig, tokens: int, seq_len: int, tp_heads: int, tp_mlp: int, tp_vocab: int
) -> dict[str, float]:
    """Bytes kept for the backward pass of one microbatch of `tokens` tokens on one device (estimate).

    Per token and layer, with a = compute-dtype bytes, d hidden, q/kv query/kv widths, f FFN, h heads, S seq_len:
      full   a·d                                  (only the layer input; the layer is recomputed)
      dots   a·(3d + q + 2kv + q + 2f) + a·h·S      (matmul outputs, attention scores included)
      none   everything the layer computes: norms, q/k/v before and after RoPE, float32 scores and probabilities,
             attention output, gate, up, silu(gate)·up, residuals.
    The recompute working set of one layer (the 'none' footprint) is added for 'full' and 'dots'.
    """
    a = jnp.dtype(cfg.dtype).itemsize
    d, f, h, S = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, seq_len
    q = h * cfg.head_dim / tp_heads
    kv = cfg.num_key_value_heads * cfg.head_dim / tp_heads
    scores = h * S / tp_heads
    f_local = f / tp_mlp
    none = a * (6 * d + 2 * (q + 2 * kv) + q + 4 * f_local) + 4 * 2 * scores
    per_layer = {"none": none, "dots": a * (3 * d + 2 * q + 2 * kv + 2 * f_local + scores), "full": a * d}[
        cfg.remat_policy
    ]
    layers = cfg.num_hidden_layers * tokens * per_layer
    working = 0.0 if cfg.remat_policy == "none" else tokens * none
    logits = tokens * cfg.vocab_size / tp_vocab * 4 * 3  # logits, softmax and their gradient in float32
    return {"saved_layers": layers, "layer_working_set": working, "logits": logits}


def make_plan(
    cfg: TeleFLMConfig,
    layout: MeshLayout,
    num_devices: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    num_microbatches: int = 1,
) -> dict[str, Any]:
    mesh = make_abstract_mesh(layout, num_devices)
    boxed = boxed_abstract_params(cfg)
    with nn.logical_axis_rules(layout.flax_rules()):
        shardings = mesh_shardings(boxed, mesh, layout)
    abstract = nn.meta.unbox(boxed)
    leaves = jax.tree_util.tree_leaves(abstract)
    shard_leaves = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    params_total = sum(math.prod(x.shape) for x in leaves)
    params_per_device = sum(math.prod(s.shard_shape(x.shape)) for x, s in zip(leaves, shard_leaves))

    split = batch_split(mesh, layout)
    batch_size = batch_size or split
    seq_len = seq_len or cfg.max_position_embeddings
    if batch_size % (split * num_microbatches):
        raise ConfigError(
            f"batch_size={batch_size} must be a multiple of the batch split ({split}) x "
            f"num_microbatches ({num_microbatches})."
        )
    tokens_per_microbatch = batch_size // split // num_microbatches * seq_len
    p_bytes = jnp.dtype(cfg.param_dtype).itemsize
    memory = {
        "params": params_per_device * p_bytes,
        "optimizer": params_per_device * ADAM_BYTES_PER_PARAM,
        "gradients": params_per_device * (p_bytes + (4 if num_microbatches > 1 else 0)),
    }
    memory.update(
        activation_bytes(
            cfg,
            tokens_per_microbatch,
            seq_len,
            axis_split(layout, mesh, "act_heads"),
            axis_split(layout, mesh, "act_mlp"),
            axis_split(layout, mesh, "act_vocab"),
        )
    )
    total = sum(memory.values())
    budget = layout.device_memory_gib
    return {
        "params_total": params_total,
        "params_formula": cfg.params_total(),
        "params_per_device": params_per_device,
        "flops_per_token": cfg.flops_per_token(seq_len),
        "mesh": dict(zip(mesh.axis_names, mesh.axis_sizes)),
        "mesh_layout": layout.name,
        "num_devices": math.prod(mesh.axis_sizes),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "num_microbatches": num_microbatches,
        "remat_policy": cfg.remat_policy,
        "bytes_per_device": {k: int(v) for k, v in memory.items()},
        "total_gib_per_device": total / GIB,
        "device_memory_gib": budget,
        "fits": None if budget is None else total / GIB <= budget,
    }


def format_plan(plan: dict[str, Any]) -> str:
    lines = [
        f"parameters      {human_count(plan['params_total'])} ({plan['params_total']:,})",
        f"mesh            {plan['mesh_layout']} {plan['mesh']} = {plan['num_devices']} devices",
        f"batch           {plan['batch_size']} x {plan['seq_len']} tokens, {plan['num_microbatches']} "
        f"microbatch(es), remat={plan['remat_policy']}",
        f"per device      {human_count(plan['params_per_device'])} parameters",
    ]
    for name, value in plan["bytes_per_device"].items():
        lines.append(f"  {name:<18}{value / GIB:10.2f} GiB")
    verdict = "" if plan["fits"] is None else ("  fits" if plan["fits"] else "  DOES NOT FIT")
    budget = "" if plan["device_memory_gib"] is None else f" of {plan['device_memory_gib']} GiB"
    lines.append(f"  {'total':<18}{plan['total_gib_per_device']:10.2f} GiB{budget}{verdict}")
    return "\n".join(lines)
