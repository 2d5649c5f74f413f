"""Grow a trained checkpoint: `python -m flm_jax.grow --gin_file=gin/growth/X.gin --from_workdir=SRC --workdir=DST`.

The growth (GrowthSpec) and the mesh layout come from the gin files; flm_jax.growth.checkpoint does the work (see
docs/growth.md). `python -m flm_jax.train --workdir=DST --gin.TrainConfig.steps=N` continues the grown run.
"""

from __future__ import annotations

from flm_jax import cli
from flm_jax.growth.checkpoint import grow_checkpoint
from flm_jax.growth.spec import GrowthSpec
from flm_jax.partitioning import MeshLayout


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--from_workdir", required=True, help="the run to grow")
    p.add_argument("--workdir", required=True, help="an empty folder for the grown run")
    p.add_argument("--step", type=int, default=None, help="default: SRC's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --workdir")
    cli.add_distributed_flags(p)
    args = cli.parse(p, argv)
    cli.init_distributed(args)
    grow_checkpoint(
        args.from_workdir,
        args.workdir,
        cli.configured(GrowthSpec),
        cli.configured(MeshLayout),
        args.step,
        args.overwrite,
    )


if __name__ == "__main__":
    cli.run_tool("grow", main)
