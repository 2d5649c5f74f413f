"""Short in-memory training runs for μP sweeps and loss-prediction proxies: fixed batches, one device, no
checkpoints. The step is the trainer's own (`flm_jax.training.step.make_train_step`), so what a sweep finds is what
the trainer does."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flm_jax import data
from flm_jax.config import TeleFLMConfig
from flm_jax.model import TeleFLM
from flm_jax.optim import OptimizerConfig, make_optimizer
from flm_jax.partitioning import MeshLayout
from flm_jax.training.step import lm_loss, make_train_step


def width_config(base: TeleFLMConfig, width: int, base_width: int, head_dim: int, mup: bool) -> TeleFLMConfig:
    """`base` at hidden size `width`: heads of `head_dim`, FFN in the base's ratio (rounded to 8); under μP the base
    shape is `base`'s at width `base_width` (width multipliers width / base_width) and the logit multiplier
    output_mult / mup_scale_factor falls as 1 / width_mult (μP's readout)."""
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")

    def ffn_at(w):
        return int(round(base.intermediate_size / base.hidden_size * w / 8)) * 8

    heads = width // head_dim
    return base.replace(
        hidden_size=width,
        intermediate_size=ffn_at(width),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        use_mup=mup,
        mup_scale_factor=width / base_width if mup else 1.0,
        mup_base_hidden_size=base_width if mup else None,
        mup_base_intermediate_size=ffn_at(base_width) if mup else None,
    )


def proxy_config(
    width: int, base_width: int, num_layers: int, head_dim: int, seq_len: int, mup: bool = True
) -> TeleFLMConfig:
    """A proxy on the embedded corpus's 2048-token vocabulary: FFN 11/4 of the width (Tele-FLM's ~2.7), output_mult
    1, width_mult = width / base_width under μP."""
    base = TeleFLMConfig(
        vocab_size=data.VOCAB_SIZE,
        hidden_size=base_width,
        intermediate_size=base_width * 11 // 4,
        num_hidden_layers=num_layers,
        num_attention_heads=base_width // head_dim,
        max_position_embeddings=seq_len,
        output_mult=1.0,
        remat_policy="none",
    )
    return width_config(base, width, base_width, head_dim, mup)


def draw_batches(name: str, split: str, count: int, batch_size: int, seq_len: int, seed: int = 0) -> list[dict]:
    it = data.BatchIterator(name, split, batch_size, seq_len, seed, shuffle=True, repeat=True)
    return [next(it) for _ in range(count)]


@dataclasses.dataclass
class RunResult:
    train_losses: list[float]
    eval_loss: float
    seconds: float
    activation_rms: dict[str, list[float]] | None = None


def activation_rms(config: TeleFLMConfig, params: Any, batch: dict) -> dict[str, list[float]]:
    """RMS of the embedding output, each layer's attention / MLP output and residual stream, and the logits."""
    _, state = TeleFLM(config, record_internals=True).apply(
        {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], mutable=["intermediates"]
    )
    flat = jax.tree_util.tree_leaves_with_path(state["intermediates"])
    rms = {jax.tree_util.keystr(p[-2:-1], simple=True): np.atleast_1d(np.asarray(v)).tolist() for p, v in flat}
    # Activations only: the sown layer-selection distance (1 - cos) is not a coordinate size.
    return {k: v for k, v in rms.items() if k.endswith("_rms")}


def run(
    config: TeleFLMConfig,
    optimizer: OptimizerConfig,
    train_batches: Sequence[dict],
    eval_batches: Sequence[dict] = (),
    seed: int = 0,
    probe: dict | None = None,
) -> RunResult:
    """Train on `train_batches` (one step each), then report the mean eval NLL (inf if it diverged) and, with a
    probe batch, the activation RMS per layer."""
    start = time.time()
    params = nn.meta.unbox(TeleFLM(config).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    tx, schedule = make_optimizer(params, config, optimizer, len(train_batches))
    step = jax.jit(make_train_step(config, tx, schedule, MeshLayout()), donate_argnums=0)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    losses = []
    for batch in train_batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if not math.isfinite(losses[-1]):
            break
    eval_loss = float("inf")
    if eval_batches and math.isfinite(losses[-1]):
        evaluate = jax.jit(lambda p, b: lm_loss(p, b, config)[1])
        sums = [evaluate(state["params"], b) for b in eval_batches]
        eval_loss = float(sum(s["nll_sum"] for s in sums) / sum(s["num_tokens"] for s in sums))
        eval_loss = eval_loss if math.isfinite(eval_loss) else float("inf")
    rms = activation_rms(config, state["params"], probe) if probe is not None else None
    return RunResult(losses, eval_loss, time.time() - start, rms)
