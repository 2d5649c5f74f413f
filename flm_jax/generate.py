"""Sample text from a checkpoint: `python -m flm_jax.generate --workdir=DIR --prompt=TEXT [--max_new_tokens=N]`.

Greedy by default; --temperature=T > 0 samples (with --top_k / --top_p). Decoding uses a KV cache
(flm_jax.inference.generate); --kv_cache=false re-runs the full forward pass at every step (the reference). --prompt
repeats: the prompts are decoded as one batch. --chat wraps each prompt in the Tele-FLM chat template (`<_user>`
prompt `<_bot>`, the chat tokenizer; a model fine-tuned on chat data, docs/sft.md) and prints the answer. --json
prints one JSON object per prompt (the prompt, the new token ids and the text). A mesh gin file
(--gin_file=gin/meshes/X.gin) places the parameters and the cache with its shardings. A grown checkpoint at mask 0
is folded into its plain equivalent; one in the middle of its mask ramp is refused.
"""

from __future__ import annotations

import json
import sys

import sentencepiece as spm

from flm_jax import cli
from flm_jax.config import ConfigError
from flm_jax.hf.tokenizer import default_tokenizer_path
from flm_jax.inference.generate import generate
from flm_jax.inference.loading import load_model
from flm_jax.partitioning import MeshLayout


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="flm_jax workdir holding checkpoints/")
    p.add_argument("--prompt", action="append", required=True, help="repeatable: the prompts form one batch")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the smallest set reaching p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv_cache", type=cli.boolean, default=True, help="false: full recompute at every step (reference)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: prompt, new token ids, text")
    p.add_argument("--chat", action="store_true", help="apply the chat template (a fine-tuned chat model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: flm_jax's tokenizer)")
    args = cli.parse(p, argv, reads_data=False)
    layout = cli.configured(MeshLayout)  # one device unless a mesh gin file says otherwise
    config, params = load_model(workdir=args.workdir, step=args.step)
    if args.chat:  # the chat tokenizer and template live with the chat data (TensorFlow is imported only here)
        from flm_jax import data

        if config.vocab_size < data.CHAT_VOCAB_SIZE:
            raise ConfigError(
                f"--chat needs a model fine-tuned with the chat tokenizer (vocab_size >= "
                f"{data.CHAT_VOCAB_SIZE}); this one has vocab_size {config.vocab_size}."
            )
        sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer or data.CHAT_TOKENIZER_PATH))
        prompts = [data.render_chat([{"role": "user", "content": text}], sp).ids for text in args.prompt]
    else:
        sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer or default_tokenizer_path()))
        prompts = [[config.bos_token_id] + sp.encode(text) for text in args.prompt]
    longest = max(map(len, prompts)) + args.max_new_tokens
    if longest > config.max_position_embeddings:
        print(
            f"generate: note: {longest} positions exceed max_position_embeddings={config.max_position_embeddings}",
            file=sys.stderr,
        )
    new = generate(
        params,
        config,
        prompts,
        args.max_new_tokens,
        args.temperature,
        args.seed,
        config.eos_token_id,
        top_k=args.top_k,
        top_p=args.top_p,
        kv_cache=args.kv_cache,
        layout=layout,
    )
    for text, ids in zip(args.prompt, new.tolist()):
        if config.eos_token_id in ids:
            ids = ids[: ids.index(config.eos_token_id)]
        if args.json:
            print(json.dumps({"prompt": text, "new_token_ids": ids, "text": sp.decode(ids)}), flush=True)
        else:
            print(sp.decode(ids) if args.chat else text + sp.decode(ids), flush=True)


if __name__ == "__main__":
    cli.run_tool("generate", main)
