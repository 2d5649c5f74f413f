"""One process of a multi-host tool chain (tests/test_multihost.py starts two, 4 CPU devices each):
train -> grow -> export -> import_hf, every tool's own main with the multi-host flags, in one jax.distributed run.

    python -m tests.multihost_tools --root=DIR --port=PORT --process_id=I    (DIR/grow.gin holds GROW_GIN)
"""

import argparse

import gin
from flm_jax import cli, export, grow, import_hf, train
from tests.helpers import MODEL_FLAGS

GROW_GIN = """
GrowthSpec.hidden_size = 96
GrowthSpec.num_attention_heads = 6
GrowthSpec.intermediate_size = 192
GrowthSpec.num_hidden_layers = 3
GrowthSpec.layer_strategy = "distance"
"""
MESH = "--gin_file=gin/meshes/fsdp.gin"
EXPORT = ["--tokenizer=none", "--max_shard_size=300KB"]  # several files, so both processes write some
TRAIN = [
    MESH,
    *MODEL_FLAGS,
    "--gin.TrainConfig.steps=2",
    "--gin.TrainConfig.batch_size=8",
    "--gin.TrainConfig.seq_len=32",
    "--gin.TrainConfig.log_every=1",
    "--gin.TrainConfig.eval_tasks=('flm_prose',)",  # the evaluator reads its validation rows per process too
    "--gin.TrainConfig.eval_split='minival'",
]


def chain(root: str, distributed: list[str]) -> None:
    """The tool chain under `root`; `distributed`: the multi-host flags every tool takes."""
    steps = [
        (train, [f"--workdir={root}/src", *TRAIN]),
        (grow, [f"--gin_file={root}/grow.gin", MESH, f"--from_workdir={root}/src", f"--workdir={root}/grown"]),
        (export, [f"--workdir={root}/src", f"--out={root}/hf", *EXPORT]),
        (import_hf, [MESH, f"--hf_dir={root}/hf", f"--workdir={root}/imported"]),
    ]
    for tool, argv in steps:
        gin.clear_config()
        tool.main([*argv, *distributed])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--process_id", type=int, required=True)
    args = p.parse_args()
    flags = [f"--coordinator_address=127.0.0.1:{args.port}", "--num_processes=2", f"--process_id={args.process_id}"]
    cli.run_tool("multihost_tools", lambda: chain(args.root, flags))


if __name__ == "__main__":
    main()
