"""Sample text from a checkpoint: `python -m flm_jax.generate --workdir=DIR --prompt=TEXT [--max_new_tokens=N]`.

Greedy by default; --temperature=T > 0 samples (flm_jax.inference.generate). A grown checkpoint at mask 0 is
folded into its plain equivalent; one in the middle of its mask ramp is refused.
"""

from __future__ import annotations

import sys

import numpy as np
import sentencepiece as spm

from flm_jax import cli
from flm_jax.growth.fold import plain_source
from flm_jax.hf.tokenizer import default_tokenizer_path
from flm_jax.inference.generate import generate
from flm_jax.training.checkpoint_reader import CheckpointReader, read_params


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="flm_jax workdir holding checkpoints/")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: flm_jax's tokenizer)")
    args = cli.parse(p, argv, reads_data=False)
    source = plain_source(CheckpointReader(args.workdir, args.step))
    config = source.config
    params = read_params(source)
    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer or default_tokenizer_path()))
    prompt = [config.bos_token_id] + sp.encode(args.prompt)
    if len(prompt) + args.max_new_tokens > config.max_position_embeddings:
        print(
            f"generate: note: {len(prompt) + args.max_new_tokens} positions exceed max_position_embeddings="
            f"{config.max_position_embeddings}",
            file=sys.stderr,
        )
    new = generate(
        params, config, np.asarray([prompt]), args.max_new_tokens, args.temperature, args.seed, config.eos_token_id
    )[0].tolist()
    if config.eos_token_id in new:
        new = new[: new.index(config.eos_token_id)]
    print(args.prompt + sp.decode(new), flush=True)


if __name__ == "__main__":
    cli.run_tool("generate", main)
