"""A plain model's config and parameters from a flm_jax workdir or a Hugging Face folder: what generation,
evaluation and the lm-eval adapter start from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.growth.fold import plain_source
from flm_jax.hf.importer import read_hf
from flm_jax.training.checkpoint_reader import CheckpointReader, read_params


def load_model(
    workdir: str | Path | None = None, hf_dir: str | Path | None = None, step: int | None = None
) -> tuple[TeleFLMConfig, Any]:
    """(config, parameter tree of numpy arrays) of a workdir's checkpoint (latest, or `step`; a grown checkpoint at
    mask 0 folded into its plain equivalent, one mid-ramp refused) or of a Hugging Face folder (through the
    importer: a llama folder written by flm_jax.export gets its μP multipliers back)."""
    if (workdir is None) == (hf_dir is None):
        raise ConfigError("give exactly one of a workdir (--workdir) and a Hugging Face folder (--hf_dir)")
    if hf_dir is not None:
        model = read_hf(hf_dir)
        return model.config, model.params
    source = plain_source(CheckpointReader(workdir, step))
    return source.config, read_params(source)
