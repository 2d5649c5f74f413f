"""Less is more? Fine-tune one pretrained tiny model on a small curated instruction set and on a set ten times larger
with noisy and off-format answers mixed in, at equal steps, and compare held-out exact match and bits per byte.

    python -m experiments.sft_less_is_more --out DIR [--quick] [--init_from=WORKDIR] [--gin.SftComparison.X=V]

The pretrained model is WORKDIR's latest checkpoint, or a tiny model (gin/experiments/tiny_pretrain.gin) trained
here for `pretrain_steps` into DIR/pretrain. The curated set is the first `curated_records` of the shipped
instruction set's train split (flm_instructions); the large set is `large_factor` times as many records of the same
split in which a `noisy_fraction` has every answer corrupted (wrong values or right values off format,
flm_jax.data.build_instructions.noisy_records). Both runs use gin/sft/tiny_sft.gin's recipe for `finetune_steps`
steps. Scores on the held-out validation split: exact match of greedy answers (flm_jax.inference.evaluation) and
bits per byte of the reference answers (the trainer's val_bpb). Writes DIR/results.json and DIR/results.png.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import gin
from flm_jax import cli, data
from flm_jax.config import TeleFLMConfig
from flm_jax.data.build_instructions import noisy_records
from flm_jax.inference.evaluation import exact_match
from flm_jax.inference.loading import load_model
from flm_jax.optim import OptimizerConfig
from flm_jax.partitioning import MeshLayout
from flm_jax.training.config import TrainConfig
from flm_jax.training.loop import train


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SftComparison:
    pretrain_steps: int = 600
    curated_records: int = 200
    large_factor: int = 10
    noisy_fraction: float = 0.3
    finetune_steps: int = 300
    seed: int = 0


QUICK = SftComparison(pretrain_steps=250, finetune_steps=150)


def write_records(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))
    return str(path)


def resolve(files: list[str], bindings: list[str], args) -> tuple:
    """The model, training and optimizer settings of gin files, then the command line's own gin files and bindings
    (resolved here, passed down)."""
    gin.clear_config()
    cli.load_gin([*files, *args.gin_file], [*bindings, *args.gin_bindings])
    return cli.configured(TeleFLMConfig), cli.configured(TrainConfig), cli.configured(OptimizerConfig)


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="250 pretraining and 150 fine-tuning steps (330 s on 2 cores)")
    p.add_argument("--init_from", default=None, help="a pretrained tiny workdir (default: pretrain one here)")
    args = cli.parse(p, argv)
    comparison = QUICK if args.quick else SftComparison()  # gin-bound: --gin.SftComparison.X=V
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    layout = MeshLayout()

    pretrained = args.init_from
    if pretrained is None:
        pretrained = str(out / "pretrain")
        model, run, optimizer = resolve(
            ["gin/experiments/tiny_pretrain.gin"],
            [
                f"TrainConfig.steps = {comparison.pretrain_steps}",
                "TrainConfig.eval_every = 0",
                "TrainConfig.eval_tasks = ()",
            ],
            args,
        )
        train(pretrained, model_cfg=model, layout=layout, optimizer_cfg=optimizer, train_cfg=run)

    with open(data.INSTRUCTIONS_FILES["train"]) as f:
        pool = [json.loads(line) for line in f if line.strip()]
    curated = pool[: comparison.curated_records]
    large = noisy_records(
        pool[: comparison.curated_records * comparison.large_factor], comparison.noisy_fraction, comparison.seed
    )
    validation = data.INSTRUCTIONS_FILES["validation"]
    sets = {
        "curated": write_records(out / "curated.jsonl", curated),
        "large_noisy": write_records(out / "large.jsonl", large),
    }
    results = {"comparison": dataclasses.asdict(comparison), "pretrained": pretrained, "runs": {}}
    for name, path in sets.items():
        task = data.register_chat_task(f"sft_{name}", {"train": path, "validation": validation})
        model, run, optimizer = resolve(
            ["gin/sft/tiny_sft.gin"],
            [
                f"TrainConfig.init_from = '{pretrained}'",
                f"TrainConfig.mixture = '{task}'",
                f"TrainConfig.eval_tasks = ('{task}',)",
                f"TrainConfig.steps = {comparison.finetune_steps}",
                f"TrainConfig.eval_every = {comparison.finetune_steps // 3}",
                f"TrainConfig.seed = {comparison.seed}",
            ],
            args,
        )
        workdir = out / name
        last = train(workdir, model_cfg=model, layout=layout, optimizer_cfg=optimizer, train_cfg=run)
        config, params = load_model(workdir=workdir)
        scores = exact_match(params, config, validation)
        logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        results["runs"][name] = {
            "records": len(curated if name == "curated" else large),
            "noisy_records": sum("noise" in r for r in (curated if name == "curated" else large)),
            "exact_match": scores["accuracy"],
            "val_bpb": last[f"val_bpb/{task}"],
            "val_loss": last[f"val_loss/{task}"],
            "examples": scores["examples"],
            "curve": [(m["step"], m["loss"], m.get(f"val_bpb/{task}")) for m in logged],
        }
        print(f"{name}: exact match {scores['accuracy']:.3f}, held-out bpb {last[f'val_bpb/{task}']:.4f}", flush=True)
    results["wall_seconds"] = time.time() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "results.png")
    print(f"wrote {out / 'results.json'} and {out / 'results.png'} in {results['wall_seconds']:.0f} s", flush=True)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8))
    names = list(runs)
    ax1.bar(names, [runs[n]["exact_match"] for n in names], color=["tab:green", "tab:red"])
    ax1.set_title("held-out exact match")
    ax2.bar(names, [runs[n]["val_bpb"] for n in names], color=["tab:green", "tab:red"])
    ax2.set_title("held-out answer bits per byte")
    for n, color in zip(names, ["tab:green", "tab:red"]):
        steps, losses = zip(*[(s, loss) for s, loss, _ in runs[n]["curve"]])
        ax3.plot(steps, losses, color=color, label=f"{n} ({runs[n]['records']} records)")
    ax3.set_title("training loss")
    ax3.set_xlabel("step")
    ax3.legend()
    fig.suptitle(f"SFT at equal steps ({results['comparison']['finetune_steps']}): curated vs 10x larger with noise")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    cli.run_tool("sft_less_is_more", main)
