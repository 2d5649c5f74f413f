"""Plan a model on a mesh without devices: parameter count and per-device memory (the library behind
`python -m flm_jax.plan`).

Parameters and their shards come from `jax.eval_shape` of the real model on a `jax.sharding.AbstractMesh`, so the
per-device numbers are the shapes the training step would use. Memory per device:
  params            shard elements x param_dtype bytes
  optimizer         AdamW first and second moments in float32 (8 bytes per shard element)
  gradients         shard elements x param_dtype bytes (+ a float32 accumulator when microbatching)
  optimizer_update  the float32 update of every shard element, computed before it is applied: after the last
                    backward pass, so the total is the state plus the larger of the two phases
  gathered_weights  FSDP all-gathers each layer's weights inside the layer scan: two layers in the compute dtype
                    (the one in use and the next one in flight), split only by the non-FSDP axes
  layer_gradient    float32 gradients of two gathered layers: one being reduce-scattered while the backward pass
                    computes the next
  activations       what the backward pass keeps under the remat policy (`activation_bytes`), plus the working
                    set of one layer being recomputed and the logits of one microbatch with their gradient.
`python -m flm_jax.plan --compile` compiles the real step for a TPU slice and prints this estimate beside XLA's
figures (flm_jax.aot; docs/scaling.md has the comparison for the three Tele-FLM stages).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flm_jax.config import ConfigError, TeleFLMConfig, human_count
from flm_jax.params import boxed_abstract_params
from flm_jax.partitioning import MeshLayout, _as_mesh_axes, batch_split, make_abstract_mesh, mesh_shardings

GIB = 1024**3
ADAM_BYTES_PER_PARAM = 8  # mu and nu in float32


def axis_split(layout: MeshLayout, mesh, logical: str) -> int:
    """How many ways the layout splits a logical axis on this mesh."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    for name, mesh_axes in layout.rules:
        if name == logical:
            return math.prod(sizes[a] for a in (mesh_axes or ()))
    return 1


def gathered_layer_elements(shardings_tree, abstract_tree, layout: MeshLayout, num_layers: int) -> float:
    """Elements of one layer's weights on a device once the FSDP axes are gathered: each per-layer parameter
    divided only by its non-FSDP mesh axes (tensor parallelism), averaged over the layer stack."""
    fsdp_axes = set(dict(layout.rules).get("embed") or ())
    leaves = jax.tree_util.tree_leaves(abstract_tree["layers"])
    shards = jax.tree_util.tree_leaves(shardings_tree["layers"], is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    total = 0.0
    for leaf, sharding in zip(leaves, shards):
        sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes))
        split = math.prod(sizes[a] for axes in sharding.spec for a in _as_mesh_axes(axes) or () if a not in fsdp_axes)
        total += math.prod(leaf.shape) / split
    return total / num_layers


def activation_bytes(
    cfg: TeleFLMConfig, tokens: int, seq_len: int, tp_heads: int, tp_mlp: int, tp_vocab: int
) -> dict[str, float]:
    """Bytes the backward pass of one microbatch of `tokens` tokens holds on one device (estimate).

    Per token, with a = compute-dtype bytes, d hidden, q/kv query/kv widths, f FFN units (all per device), and
    P = float32 bytes of one score matrix row (heads x seq_len; 0 with splash attention, which never builds one):
      one layer, all of it  a·(6d + 2(q + 2kv) + q + 4f) + 2P: norms, q/k/v before and after RoPE, scores and
                            probabilities, attention output, gate, up, silu(gate)·up, residuals
      saved per layer       none: all of it; full: a·d (the input); minimal: a·(2d + q + 2kv + 2f) (the input
                            and the weight matmuls' outputs that the backward pass reads: q, k, v, o, gate, up);
                            dots: minimal + a·(P/4 + q) (the score and value matmuls too); save_attn: a·(d + q);
                            offload_attn: a·d (the attention output goes to host memory)
    The backward pass of one rematerialised layer also rebuilds what its policy did not save (one layer whole
    less the saved part), and the loss holds the logits (in the compute dtype, as the LM head's matmul gives them)
    and their float32 gradient; XLA fuses the float32 softmax into them.
    """
    a = jnp.dtype(cfg.dtype).itemsize
    d, f, h = cfg.hidden_size, cfg.intermediate_size / tp_mlp, cfg.num_attention_heads / tp_heads
    q = h * cfg.head_dim
    kv = cfg.num_key_value_heads / tp_heads * cfg.head_dim
    score_row = 0.0 if cfg.attention_impl == "splash" else 4 * h * seq_len
    whole_layer = a * (6 * d + 2 * (q + 2 * kv) + q + 4 * f) + 2 * score_row
    minimal = a * (2 * d + q + 2 * kv + 2 * f)
    saved = {
        "none": whole_layer,
        "full": a * d,
        "dots": minimal + a * (score_row / 4 + q),
        "minimal": minimal,
        "save_attn": a * (d + q),
        "offload_attn": a * d,
    }[cfg.remat_policy]
    working = 0.0 if cfg.remat_policy == "none" else max(whole_layer - saved, 0.0)
    return {
        "saved_layers": cfg.num_hidden_layers * tokens * saved,
        "layer_working_set": tokens * working,
        "logits": tokens * cfg.vocab_size / tp_vocab * (a + 4),
    }


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
    layer_elements = gathered_layer_elements(shardings, abstract, layout, cfg.num_hidden_layers)
    memory = {
        "params": params_per_device * p_bytes,
        "optimizer": params_per_device * ADAM_BYTES_PER_PARAM,
        "gradients": params_per_device * (p_bytes + (4 if num_microbatches > 1 else 0)),
        "optimizer_update": params_per_device * 4,
        "gathered_weights": 2 * layer_elements * jnp.dtype(cfg.dtype).itemsize,
        "layer_gradient": 2 * layer_elements * 4,
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
    # The optimizer update runs after the last microbatch's backward pass has freed its activations: the peak is
    # the larger of the two phases, on top of the state.
    state = memory["params"] + memory["optimizer"]
    update_phase = memory["gradients"] + memory["optimizer_update"]
    total = state + max(sum(memory.values()) - state - memory["optimizer_update"], update_phase)
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


def format_comparison(plan: dict[str, Any]) -> str:
    """The estimate and the compiled step's per-chip memory side by side, then the compiled step's FLOPs and time."""
    c = plan["compiled"]
    lines = [
        format_plan(plan),
        "",
        f"compiled        {c['topology']} ({c['topology_name']}, {c['num_chips']} chips, {c['num_hosts']} hosts) "
        f"in {c['compile_seconds']:.0f} s",
        f"  {'arguments':<18}{c['argument_gib']:10.2f} GiB",
        f"  {'outputs':<18}{c['output_gib']:10.2f} GiB",
        f"  {'aliased (donated)':<18}{c['alias_gib']:10.2f} GiB",
        f"  {'temporaries':<18}{c['temp_gib_per_device']:10.2f} GiB",
        f"  {'code':<18}{c['code_gib']:10.2f} GiB",
        f"  {'total':<18}{c['total_gib_per_device']:10.2f} GiB of {c['hbm_gib']} GiB"
        f"  {'fits' if c['fits'] else 'DOES NOT FIT'}",
        f"estimate        {plan['total_gib_per_device']:.2f} GiB, {plan['estimate_error']:+.1%} against the compiler",
        f"flops per chip  {c['flops_per_device']:.3e} per step (compiler's analysis x {c['loop_scale']:.1f} for "
        f"loop trip counts); model {c['model_flops_per_device']:.3e}",
        f"step time       {c['step_time_at_peak_s']:.2f} s at the peak {c['peak_flops_per_device']:.3g} FLOP/s per "
        f"chip, MFU {c['mfu_at_peak']:.1%} at best",
    ]
    if c["uncounted_kernels"]:
        lines.append(
            f"                (without the FLOPs of {', '.join(c['uncounted_kernels'])}: Pallas kernels that declare "
            "no cost, so the time is low and the MFU high by their share)"
        )
    return "\n".join(lines)
