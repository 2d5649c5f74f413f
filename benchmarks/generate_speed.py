"""Generation speed with and without the KV cache, side by side in one process.

    python -m benchmarks.generate_speed [--gin_file=gin/models/tiny.gin] [--out=runs/generate_speed.json]

A randomly initialised model of the gin file's shape (default: gin/models/tiny.gin) decodes a batch of prompts
greedily, for each number of new tokens, once with the KV cache and once with full recomputation; each variant is
compiled first (a warm-up call), then timed over --repeats calls, interleaved. Prints and writes new tokens per
second of each and their ratio. Nothing else should run on the machine while it measures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from flm_jax import cli
from flm_jax.config import TeleFLMConfig
from flm_jax.inference.generate import generate
from flm_jax.model import TeleFLM


def tokens_per_second(params, config, prompts, new_tokens: int, kv_cache: bool) -> float:
    started = time.perf_counter()
    out = generate(params, config, prompts, new_tokens, kv_cache=kv_cache)
    return out.size / (time.perf_counter() - started)


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/generate_speed.json")
    p.add_argument("--new_tokens", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = cli.parse(p, argv, reads_data=False)
    if not args.gin_file:
        cli.load_gin(["gin/models/tiny.gin"], args.gin_bindings, reads_data=False)
    config = cli.configured(TeleFLMConfig)
    params = nn.meta.unbox(TeleFLM(config).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config.vocab_size, (args.batch_size, args.prompt_len)).tolist()
    results = {
        "device": jax.devices()[0].device_kind,
        "params": config.params_total(),
        "batch_size": args.batch_size,
        "prompt_len": args.prompt_len,
        "runs": [],
    }
    for n in args.new_tokens:
        for kv_cache in (True, False):  # compile both before timing either
            generate(params, config, prompts, n, kv_cache=kv_cache)
        timed = {True: [], False: []}
        for _ in range(args.repeats):
            for kv_cache in (True, False):
                timed[kv_cache].append(tokens_per_second(params, config, prompts, n, kv_cache))
        cached, full = float(np.median(timed[True])), float(np.median(timed[False]))
        results["runs"].append(
            {"new_tokens": n, "kv_cache_tok_s": cached, "full_recompute_tok_s": full, "speedup": cached / full}
        )
        print(
            f"{n:4d} new tokens: KV cache {cached:8.1f} tok/s, full recompute {full:8.1f} tok/s, x{cached / full:.2f}",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    cli.run_tool("generate_speed", main)
