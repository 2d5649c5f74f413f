"""Peak dense matmul throughput per device, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import jax

import gin

# bf16 dense peak FLOP/s by device_kind substring (vendor datasheets); CPU: jnp.dot 2048^2 float32 measured on the
# 2-core development machine (docs/stack.md), an order of magnitude, not a datasheet figure.
PEAK_FLOPS = {
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v6": 918e12,
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
