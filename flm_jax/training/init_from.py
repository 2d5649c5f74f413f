"""Starting a run from another workdir's parameters (`TrainConfig.init_from`): fine-tuning a pretrained, grown or
imported checkpoint with a fresh optimizer and the new run's own schedule.

The source is read as the plain model it computes (flm_jax.growth.fold.plain_source: a grown checkpoint at mask 0 is
folded, one mid-ramp is refused with the reason). The run's model config must have the source's architecture; only
the vocabulary may be larger (a chat tokenizer adds marker pieces): then the embedding gets new rows and the LM head
new zero columns (the growth package's vocabulary padding, docs/growth_math.md §8), so every old logit is kept (not
the loss: the new tokens' logits, 0, join the softmax normaliser).
"""

from __future__ import annotations

from typing import Any

import jax

from flm_jax.config import MUP_BASE_FIELDS, RUNTIME_FIELDS, ConfigError, TeleFLMConfig
from flm_jax.growth import GrowthSpec, grow
from flm_jax.growth.fold import plain_source
from flm_jax.params import param_shardings
from flm_jax.partitioning import MeshLayout
from flm_jax.paths import PathLike, as_path
from flm_jax.training.checkpoint_reader import CheckpointReader, read_params

# Fields that a fine-tuning run inherits from its source: the RMSNorm corrections plain_source may set on a folded
# grown model, and the μP base shape (so the source's width multipliers carry on).
INHERITED_FIELDS = ("rms_norm_eps", "rms_norm_scale", *MUP_BASE_FIELDS)


def source_params(
    workdir: PathLike, model_cfg: TeleFLMConfig, mesh, layout: MeshLayout, seed: int = 0
) -> tuple[TeleFLMConfig, Any, dict[str, Any]]:
    """(the run's model config, its initial parameters placed with the layout's shardings, provenance for the
    checkpoint metadata) from workdir's latest checkpoint."""
    if not (as_path(workdir) / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"TrainConfig.init_from={str(workdir)!r} has no checkpoints/: name a flm_jax workdir "
            "(a pretraining, grow or import_hf run)."
        )
    reader = CheckpointReader(workdir)
    source = plain_source(reader)
    src = source.config
    model_cfg = model_cfg.replace(**{k: getattr(src, k) for k in INHERITED_FIELDS})
    runtime = {k: getattr(model_cfg, k) for k in RUNTIME_FIELDS}
    wanted, have = model_cfg.to_dict(), src.replace(vocab_size=model_cfg.vocab_size, **runtime).to_dict()
    differs = {k: (have[k], wanted[k]) for k in wanted if have[k] != wanted[k]}
    if differs or model_cfg.vocab_size < src.vocab_size:
        differs.setdefault("vocab_size", (src.vocab_size, model_cfg.vocab_size))
        raise ConfigError(
            f"TrainConfig.init_from={str(workdir)!r} holds another architecture than the run's TeleFLMConfig: "
            + ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in differs.items())
            + ". Use the source's model gin file (only vocab_size may grow, for new tokens)."
        )
    params = read_params(source)
    if model_cfg.vocab_size > src.vocab_size:
        params = grow(
            params,
            src.replace(**runtime),
            GrowthSpec(vocab_size=model_cfg.vocab_size, mode="exact"),
            jax.random.key(seed),
        ).params
    params = jax.device_put(params, param_shardings(model_cfg, mesh, layout))
    return model_cfg, params, {"initialized_from": {"workdir": str(workdir), "step": reader.step}}
