"""flm_jax.data (API filled in below)."""
