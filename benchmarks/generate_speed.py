"""flm_jax's KV-cache decoding against Hugging Face transformers' `generate` on the exported model, side by side.

    python -m benchmarks.generate_speed [--gin_file=gin/models/tiny.gin] [--batch_sizes 1 8] [--prompt_len=32]
                                        [--new_tokens=128] [--repeats=3] [--threads=N] [--out=F] [--smoke]

A randomly initialised model of the gin file's shape is saved as a workdir checkpoint and exported with
flm_jax.export (--format=llama, float32); flm_jax decodes from the checkpoint (`flm_jax.inference.generate`, KV
cache, eos_id None), transformers from the export (LlamaForCausalLM in float32, eval, `generate` with do_sample=False,
use_cache=True, exactly --new_tokens new tokens: no EOS). Each side runs in its own process on the same seeded random
prompts: per batch size a warm-up call (flm_jax compiles its decoder there), then the best of --repeats timed calls.
flm_jax also decodes with full recomputation (`kv_cache=False`, the reference decoder) for the KV cache's own gain.
Reported per batch size: new tokens/s of each (batch x new_tokens / seconds, prefill included), their ratios, and the
fraction of greedy tokens on which flm_jax and transformers agree (recorded, not asserted: float32 roundings
differ, and one different token changes the rest of its row). Limits: on a CPU a small model's decoding is bound
by per-step overhead (an XLA while-loop iteration against eager PyTorch's Python per layer), not by FLOPs;
transformers runs as shipped (dynamic cache, no torch.compile); JAX uses every core, PyTorch --threads (default:
every core).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

from benchmarks import common
from flm_jax import cli
from flm_jax.config import TeleFLMConfig

MODULE = "benchmarks.generate_speed"
DEFAULT_GIN = "gin/models/tiny.gin"
SIDES = ("flm_jax", "transformers")
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "dtype",
)
# --smoke: a seconds-long run of the whole script (tests/test_benchmarks.py), figures meaningless.
SMOKE_RUN = {"prompt_len": 8, "new_tokens": 4, "repeats": 1}


def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int):
    """[batch, prompt_len] token ids past the special ones (0-2), the same in every process for the same seed."""
    import numpy as np

    return np.random.default_rng([seed, batch]).integers(3, vocab_size, (batch, prompt_len))


def write_model(config: TeleFLMConfig, workdir: str, hf_dir: str, seed: int) -> None:
    """A randomly initialised checkpoint of `config` in workdir (step 0, parameters only: all that export and
    loading read), exported to hf_dir as a float32 llama folder."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flm_jax.hf.export import export
    from flm_jax.model import TeleFLM, init_inputs
    from flm_jax.training.checkpoint import Checkpointer, make_metadata

    init = jax.jit(lambda rng: nn.meta.unbox(TeleFLM(config).init(rng, init_inputs())["params"]))
    state = {"step": jnp.zeros((), jnp.int32), "params": init(jax.random.key(seed))}
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(0, state, {}, make_metadata(config), force=True)
    ckpt.close()
    export(workdir, hf_dir, "llama", "float32", tokenizer="none", progress=lambda _: None)


def time_side(decode, batch_sizes: list[int], prompt_len: int, vocab_size: int, seed: int, repeats: int) -> dict:
    """Per batch size: decode(prompts) once to warm up, then the best of `repeats` timed calls, and its tokens."""
    out = {}
    for b in batch_sizes:
        prompts = random_prompts(b, prompt_len, vocab_size, seed)
        started = time.perf_counter()
        tokens = decode(prompts)
        warmup = time.perf_counter() - started
        out[str(b)] = {
            "seconds": common.best_of(functools.partial(decode, prompts), repeats),
            "warmup_s": warmup,
            "tokens": tokens.tolist(),
        }
    return out


def flm_jax_worker(args) -> None:
    import jax

    from flm_jax.inference.generate import generate
    from flm_jax.inference.loading import load_model

    config, params = load_model(workdir=args.model_dir)
    params = jax.device_put(params)

    def decoder(kv_cache: bool):
        return lambda prompts: generate(params, config, prompts, args.new_tokens, eos_id=None, kv_cache=kv_cache)

    shape = (args.batch_sizes, args.prompt_len, config.vocab_size, args.seed, args.repeats)
    timed = {
        name: time_side(decoder(kv_cache), *shape)
        for name, kv_cache in (("batches", True), ("full_recompute_batches", False))
    }
    common.emit({**timed, "device": jax.devices()[0].device_kind})


def transformers_worker(args) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM.from_pretrained(args.model_dir, local_files_only=True, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # never stop early, and so never suppress a token either
    n = args.new_tokens

    def decode(prompts):
        input_ids = torch.as_tensor(prompts)
        with torch.no_grad():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                use_cache=True,
                max_new_tokens=n,
                min_new_tokens=n,
                eos_token_id=None,
                pad_token_id=model.config.pad_token_id,
            )
        new = out[:, input_ids.shape[1] :]
        if new.shape[1] != n:
            raise RuntimeError(f"transformers generated {new.shape[1]} tokens, not {n}")
        return new.numpy()

    runs = time_side(decode, args.batch_sizes, args.prompt_len, model.config.vocab_size, args.seed, args.repeats)
    common.emit({"batches": runs, "threads": torch.get_num_threads(), "attention": model.config._attn_implementation})


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The fraction of positions at which two token arrays of the same shape hold the same id."""
    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)]
    return sum(x == y for x, y in pairs) / len(pairs)


def summarise(runs: dict[str, dict], batch_sizes: list[int], new_tokens: int) -> list[dict]:
    rows = []
    for b in batch_sizes:
        ours, theirs = runs["flm_jax"]["batches"][str(b)], runs["transformers"]["batches"][str(b)]
        full = runs["flm_jax"]["full_recompute_batches"][str(b)]
        ours_tok_s, theirs_tok_s = b * new_tokens / ours["seconds"], b * new_tokens / theirs["seconds"]
        full_tok_s = b * new_tokens / full["seconds"]
        rows.append(
            {
                "batch_size": b,
                "flm_jax_tok_s": ours_tok_s,
                "transformers_tok_s": theirs_tok_s,
                "flm_jax_over_transformers": ours_tok_s / theirs_tok_s,
                "tokens_agree": agreement(ours["tokens"], theirs["tokens"]),
                "flm_jax_full_recompute_tok_s": full_tok_s,
                "kv_cache_over_full_recompute": ours_tok_s / full_tok_s,
                "flm_jax_warmup_s": ours["warmup_s"],
                "transformers_warmup_s": theirs["warmup_s"],
            }
        )
    return rows


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side and batch size (the best counts)")
    p.add_argument("--seed", type=int, default=0, help="of the initialisation and the prompts")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's threads (JAX uses every core)")
    p.add_argument("--out", default="runs/benchmarks/generate_speed.json")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on a toy shape (the figures mean nothing)")
    p.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model_dir", default=None, help=argparse.SUPPRESS)
    args = cli.parse(p, argv, reads_data=False, load=False)
    if args.smoke:
        vars(args).update(SMOKE_RUN)
    if args.worker == "flm_jax":
        return flm_jax_worker(args)
    if args.worker == "transformers":
        return transformers_worker(args)

    if args.smoke:
        common.run_workers_in_process()
    bindings = (common.SMOKE_MODEL_BINDINGS if args.smoke else []) + args.gin_bindings
    cli.load_gin(args.gin_file or [DEFAULT_GIN], bindings, reads_data=False)
    config = cli.configured(TeleFLMConfig)
    if min(args.batch_sizes + [args.prompt_len, args.new_tokens, args.repeats]) < 1:
        raise cli.ConfigError("--batch_sizes, --prompt_len, --new_tokens and --repeats must be >= 1.")
    if args.prompt_len + args.new_tokens > config.max_position_embeddings:
        raise cli.ConfigError(
            f"--prompt_len + --new_tokens = {args.prompt_len + args.new_tokens} exceeds the model's "
            f"max_position_embeddings {config.max_position_embeddings}."
        )
    shared = [
        "--batch_sizes",
        *map(str, args.batch_sizes),
        f"--prompt_len={args.prompt_len}",
        f"--new_tokens={args.new_tokens}",
        f"--repeats={args.repeats}",
        f"--seed={args.seed}",
        f"--threads={args.threads}",
    ]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir, hf_dir = os.path.join(tmp, "workdir"), os.path.join(tmp, "hf")
        print(f"writing a random {config.params_total() / 1e6:.1f}M-parameter checkpoint and its export ...")
        write_model(config, workdir, hf_dir, args.seed)
        for side, model_dir in zip(SIDES, (workdir, hf_dir)):
            print(f"{side} ...", flush=True)
            runs[side] = common.run_worker(MODULE, ["--worker", side, f"--model_dir={model_dir}", *shared])
    rows = summarise(runs, args.batch_sizes, args.new_tokens)
    for run in runs.values():
        for key in ("batches", "full_recompute_batches"):
            for batch in run.get(key, {}).values():
                del batch["tokens"]
    results = {
        "machine": common.machine(),
        "smoke": args.smoke,
        "params": config.params_total(),
        "shape": {k: getattr(config, k) for k in SHAPE_FIELDS},
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "jax_device": runs["flm_jax"]["device"],
        "torch_threads": runs["transformers"]["threads"],
        "batches": rows,
        "runs": runs,
    }
    print(f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens, greedy, best of {args.repeats}:")
    print("batch  flm_jax tok/s  transformers tok/s  flm_jax/transformers  tokens agree  full recompute tok/s  KV/full")
    for r in rows:
        print(
            f"{r['batch_size']:5d}  {r['flm_jax_tok_s']:13.1f}  {r['transformers_tok_s']:18.1f}  "
            f"{r['flm_jax_over_transformers']:19.2f}x  {r['tokens_agree']:12.1%}  "
            f"{r['flm_jax_full_recompute_tok_s']:20.1f}  {r['kv_cache_over_full_recompute']:6.2f}x"
        )
    common.write_results(args.out, results)


if __name__ == "__main__":
    cli.run_tool("generate_speed", main)
