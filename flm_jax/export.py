"""Export a checkpoint to Hugging Face: `python -m flm_jax.export --workdir=DIR --format=llama --out=HF_DIR`.

  --format=llama    LlamaForCausalLM with μP multipliers folded into the weights; loads with no custom code.
  --format=teleflm  the released TeleFLM layout: weights as trained, multipliers in config.json.
  --dtype=float32|bfloat16, --step=N (default: latest), --max_shard_size=5GB (sharded with an index past it).

Streams the checkpoint a layer at a time (flm_jax.hf.export); a checkpoint in the middle of a growth mask ramp is
refused. See docs/export.md.
"""

from __future__ import annotations

from flm_jax import cli
from flm_jax.hf.export import DEFAULT_MAX_SHARD_SIZE, export
from flm_jax.hf.layout import FORMATS, LLAMA


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="flm_jax workdir holding checkpoints/")
    p.add_argument("--out", required=True, help="Hugging Face folder to write")
    p.add_argument("--format", default=LLAMA, choices=FORMATS)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--max_shard_size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="largest safetensors file, e.g. 5GB, 500MB (sharded with an index past it)",
    )
    p.add_argument(
        "--tokenizer", default=None, help="SentencePiece model to export (default: flm_jax's tokenizer; 'none' to skip)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace model files in a non-empty --out")
    cli.add_distributed_flags(p)
    args = cli.parse(p, argv, reads_data=False)
    cli.init_distributed(args)
    export(
        args.workdir, args.out, args.format, args.dtype, args.step, args.max_shard_size, args.tokenizer, args.overwrite
    )


if __name__ == "__main__":
    cli.run_tool("export", main)
