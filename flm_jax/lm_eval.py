"""Evaluate a checkpoint with lm-evaluation-harness: `python -m flm_jax.lm_eval --model_args workdir=DIR --tasks T`.

lm-eval's own command line (`lm-eval run`) with the flm_jax model registered and chosen: any lm-eval flag works
(--include_path DIR for local tasks, --num_fewshot, --limit, --batch_size, --output_path, --log_samples, ...), and
--model defaults to flm_jax. model_args: workdir=DIR or hf_dir=DIR, optionally step, batch_size, max_gen_toks,
tokenizer, seed (flm_jax.inference.lm_eval_adapter). The shipped example task:
    python -m flm_jax.lm_eval --model_args workdir=DIR --tasks flm_prose_choice \
        --include_path flm_jax/data/assets/lm_eval_tasks
`python -m flm_jax.lm_eval ls tasks` and `validate` pass through unchanged.
"""

from __future__ import annotations

import sys

from flm_jax import cli

SUBCOMMANDS = ("run", "ls", "validate")


def main(argv=None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import flm_jax.inference.lm_eval_adapter  # noqa: F401  (registers the model "flm_jax")

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[:1] if argv[:1] and argv[0] in SUBCOMMANDS else []
    rest = argv[len(command) :]
    if command in ([], ["run"]) and not any(a in ("--model", "-M") or a.startswith("--model=") for a in rest):
        rest = ["--model", "flm_jax", *rest]
    sys.argv = ["lm-eval", *command, *rest]  # lm-eval's parser reads sys.argv
    cli_evaluate()


if __name__ == "__main__":
    cli.run_tool("lm_eval", main)
