"""Evaluate a checkpoint: `python -m flm_jax.evaluate --workdir=DIR|--hf_dir=DIR --out=FILE.json`.

Writes (and prints) {"domains": {task: {"loss", "tokens", "bytes", "bpb"}}, "total": {...}} over the validation
split of every task of --mixture (default: the embedded corpus, prose and code), plus "files" for each --text_file
(a text file is one document, a .jsonl file one document per line's "text") and "multiple_choice" accuracy for each
--choices_file (JSONL {"question", "choices", "answer"}); "exact_match" accuracy of a chat model's greedy answers
for each --chat_file, and with --exact_match for the shipped instruction set's held-out split. --hf_dir scores a
Hugging Face folder through the importer, so a released Tele-FLM-shaped model is scored the same way. A mesh gin
file places the model. See docs/evaluation.md.
"""

from __future__ import annotations

import json

from flm_jax import cli, data
from flm_jax.config import ConfigError
from flm_jax.files import atomic_write_text, check_output_folder
from flm_jax.inference.evaluation import evaluate
from flm_jax.inference.loading import load_model
from flm_jax.partitioning import MeshLayout
from flm_jax.paths import as_path


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="flm_jax workdir holding checkpoints/")
    p.add_argument("--hf_dir", default=None, help="a Hugging Face folder instead of a workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--mixture", default="flm_default", help="a seqio mixture or task: its validation split")
    p.add_argument("--text_file", action="append", default=[], help="a text or JSONL file to score (repeatable)")
    p.add_argument("--choices_file", action="append", default=[], help="multiple-choice JSONL (repeatable)")
    p.add_argument(
        "--chat_file",
        action="append",
        default=[],
        help="chat JSONL whose last answers are scored by exact match (repeatable)",
    )
    p.add_argument(
        "--exact_match",
        action="store_true",
        help="exact match on the shipped instruction set's held-out split (a fine-tuned chat model)",
    )
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256, help="packed row length (at most max_position_embeddings)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: flm_jax's tokenizer)")
    args = cli.parse(p, argv)
    out = as_path(args.out)
    if out.is_dir():
        raise ConfigError(
            f"--out {out} is a folder; pass the path of the JSON file to write, e.g. {out / 'eval.json'}."
        )
    check_output_folder(out.parent, "--out's folder")
    data.register_tasks()  # the default tasks plus any registered from gin
    config, params = load_model(args.workdir, args.hf_dir, args.step)
    result = evaluate(
        config,
        params,
        cli.configured(MeshLayout),
        mixture=args.mixture,
        text_files=args.text_file,
        choice_files=args.choices_file,
        chat_files=args.chat_file + ([data.INSTRUCTIONS_FILES["validation"]] if args.exact_match else []),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        tokenizer=args.tokenizer,
    )
    result["model"] = {
        "workdir": args.workdir,
        "hf_dir": args.hf_dir,
        "step": args.step,
        "params": config.params_total(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    cli.run_tool("evaluate", main)
