"""flm_jax: the Tele-FLM series (52B -> 102B -> 1T) in JAX/Flax, with μP and progressive growth.

The core is flat (config, model, mup, optim, partitioning, params); concerns are packages: data/, training/,
growth/, hf/, inference/. `python -m flm_jax.<tool>` entry points are thin. docs/architecture.md is the map.
"""

from flm_jax import hugepages

hugepages.reexec_command_line()  # first: a command line restarts with huge pages before importing JAX

from flm_jax.config import ConfigError, TeleFLMConfig  # noqa: E402
from flm_jax.model import TeleFLM  # noqa: E402
from flm_jax.optim import OptimizerConfig  # noqa: E402
from flm_jax.partitioning import MeshLayout  # noqa: E402

__all__ = ["ConfigError", "MeshLayout", "OptimizerConfig", "TeleFLM", "TeleFLMConfig"]
