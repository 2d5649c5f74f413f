"""Peak dense matmul throughput per device, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import jax

import gin
from flm_jax.topology import CHIPS

# bf16 dense peak FLOP/s by device_kind substring (vendor datasheets); CPU: jnp.dot 2048^2 float32 measured on the
# 2-core development machine (docs/stack.md), an order of magnitude, not a datasheet figure.
# TPU figures are flm_jax.topology's chip table (what `flm_jax.plan --compile` uses).
PEAK_FLOPS = {
    "TPU v5p": CHIPS["v5p"].peak_flops,
    "TPU v5 lite": CHIPS["v5e"].peak_flops,
    "TPU v5e": CHIPS["v5e"].peak_flops,
    "TPU v4": CHIPS["v4"].peak_flops,
    "TPU v6": CHIPS["v6e"].peak_flops,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "cpu": 178e9,
}


@gin.configurable
def peak_flops_per_device(device: jax.Device | None = None, override: float | None = None) -> float:
    """Bind `peak_flops_per_device.override` in gin for hardware this table does not know."""
    if override:
        return float(override)
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return PEAK_FLOPS["cpu"] if jax.default_backend() == "cpu" else float("nan")
