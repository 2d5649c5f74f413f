"""Cloud TPU slices described without a TPU: slice names, chip properties and the devices XLA compiles for.

`python -m flm_jax.plan --compile` compiles the real train step for a TPU slice on a CPU host. XLA's TPU
compiler ships in `libtpu` (requirements-tpu-compile.txt); `jax.experimental.topologies` turns a topology name
into device descriptions that `jax.make_mesh` and `jit(...).lower(...).compile()` accept, with no chip present.

Slice names follow Cloud TPU: v4 and v5p count TensorCores (two per chip), so `v5p-2048` is 1024 chips; v5e and
v6e count chips (`v5e-256` is 256). A name with a shape, `v5p:8x8x16`, is taken as it is.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from flm_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
    """What one chip of a TPU generation offers: HBM and bf16 dense peak (datasheets)."""

    hbm_gib: float
    peak_flops: float
    cores_per_chip: int  # how many TensorCores a slice name counts per chip
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)


CHIPS = {
    "v4": Chip(hbm_gib=32.0, peak_flops=275e12, cores_per_chip=2, dims=3),
    "v5p": Chip(hbm_gib=95.0, peak_flops=459e12, cores_per_chip=2, dims=3),
    "v5e": Chip(hbm_gib=16.0, peak_flops=197e12, cores_per_chip=1, dims=2),
    "v6e": Chip(hbm_gib=32.0, peak_flops=918e12, cores_per_chip=1, dims=2),
}
# The physical shape of the standard slices, by chip count (Cloud TPU documentation).
SHAPES_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
    6144: (16, 16, 24),
    8960: (16, 20, 28),
}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
ALIASES = {"v5litepod": "v5e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One TPU slice: generation, physical chip grid, and the chip grid of one host."""

    name: str  # as the user gave it, e.g. "v5p-2048"
    generation: str
    shape: tuple[int, ...]
    host_bounds: tuple[int, int, int]

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def num_hosts(self) -> int:
        return max(self.num_chips // math.prod(self.host_bounds), 1)

    @property
    def topology_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    def devices(self) -> list:
        """Device descriptions of every chip (jax.experimental.topologies; needs libtpu, no TPU)."""
        # Compiling touches no chip, so several compiling processes (a test run and a plan) may share libtpu,
        # which otherwise takes a host-wide lock.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            from jax.experimental import topologies

            desc = topologies.get_topology_desc(
                platform="tpu",
                topology_name=self.topology_name,
                chip_config_name="megacore" if self.chip.cores_per_chip == 2 else "default",
                chips_per_host_bounds=self.host_bounds,
                num_slices=1,
            )
        except (RuntimeError, ValueError) as e:
            raise ConfigError(
                f"Cannot describe TPU slice {self.name} ({self.topology_name}) without a TPU: {e}. Compiling for "
                "TPU on this host needs libtpu: pip install -r requirements-tpu-compile.txt (docs/scaling.md)."
            ) from e
        return list(desc.devices)


def parse_slice(name: str) -> TpuSlice:
    """A Cloud TPU slice name (`v5p-2048`, `v5e-256`, `v5litepod-16`, `v6e-256`) or topology (`v5p:8x8x16`)."""
    match = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    generation = match and ALIASES.get(match.group(1), match.group(1))
    if not match or generation not in CHIPS:
        raise ConfigError(
            f"Unknown TPU slice {name!r}. Give a Cloud TPU slice name such as v5p-128 (64 chips), v5p-2048, "
            f"v5e-256 or v6e-256, or a topology such as v5p:4x4x4; generations: {sorted(CHIPS)}."
        )
    chip = CHIPS[generation]
    if match.group(3):
        shape = tuple(int(s) for s in match.group(3).split("x"))
        if len(shape) != chip.dims:
            raise ConfigError(f"TPU topology {name!r}: a {generation} slice is {chip.dims}-dimensional.")
    else:
        count = int(match.group(2))
        shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
        chips = count // chip.cores_per_chip
        if count % chip.cores_per_chip or chips not in shapes:
            known = ", ".join(f"{generation}-{n * chip.cores_per_chip}" for n in shapes)
            raise ConfigError(f"Unknown {generation} slice {name!r}; the standard slices are {known}.")
        shape = shapes[chips]
    return TpuSlice(name, generation, shape, _host_bounds(generation, shape))


def _host_bounds(generation: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Chips per host: a host of v4/v5p holds 2x2x1 chips, of a multi-host v5e/v6e slice 2x2; a single-host
    v5e/v6e slice takes up to 8 chips."""
    single_host_chips = 8 if CHIPS[generation].dims == 2 else 4
    if math.prod(shape) <= single_host_chips:
        return tuple((*shape, 1, 1)[:3])
    return (2, 2, 1)
