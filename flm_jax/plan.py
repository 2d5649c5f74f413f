"""Plan a model on a mesh without devices: parameter count and per-device memory (flm_jax.planning).

python -m flm_jax.plan --gin_file=gin/models/1t.gin --gin_file=gin/meshes/tpu_v5p_1024.gin [--json]
"""

from __future__ import annotations

import json

from flm_jax import cli
from flm_jax.config import TeleFLMConfig
from flm_jax.partitioning import MeshLayout
from flm_jax.planning import format_plan, make_plan


def main(argv=None) -> None:
    p = cli.parser("Parameter count and per-device memory of a model on a mesh layout, without devices.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--num_devices", type=int, default=None, help="override the mesh file's device count")
    p.add_argument(
        "--batch_size", type=int, default=None, help="global batch in sequences (default: one per batch shard)"
    )
    p.add_argument("--seq_len", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--num_microbatches", type=int, default=1)
    args = cli.parse(p, argv, reads_data=False)
    plan = make_plan(
        cli.configured(TeleFLMConfig),
        cli.configured(MeshLayout),
        args.num_devices,
        args.batch_size,
        args.seq_len,
        args.num_microbatches,
    )
    print(json.dumps(plan) if args.json else format_plan(plan))


if __name__ == "__main__":
    cli.run_tool("plan", main)
