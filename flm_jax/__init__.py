"""flm_jax: the Tele-FLM series (52B -> 102B -> 1T) in JAX/Flax, with μP and progressive growth."""

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.model import TeleFLM
from flm_jax.partitioning import MeshLayout

__all__ = ["ConfigError", "MeshLayout", "TeleFLM", "TeleFLMConfig"]
