"""A stage's train step compiled for its TPU slice under each remat policy and attention implementation.

    python -m experiments.pod_compile --gin_file=gin/models/52b.gin --gin_file=gin/meshes/tpu_v5p_52b.gin \
        --out DIR [--remat=full,minimal,save_attn] [--attention=einsum,splash]

Needs libtpu (requirements-tpu-compile.txt), no TPU. Every variant is the real step of `flm_jax.train` with one
setting changed, compiled by XLA's TPU compiler on this host (flm_jax.aot). Writes DIR/<layout>.json (a report per
variant) and prints a table: per-chip memory, whether it fits, executed FLOPs and the step time at peak, the MFU that
would leave, and the compile time. A variant the compiler refuses (e.g. out of HBM) is a row with its error.
docs/scaling.md has the tables of the shipped layouts and the defaults chosen from them.
"""

import json
from pathlib import Path

from flm_jax import aot, cli
from flm_jax.config import ATTENTION_IMPLS, REMAT_POLICIES, TeleFLMConfig
from flm_jax.optim import OptimizerConfig
from flm_jax.partitioning import MeshLayout
from flm_jax.plan import train_setting
from flm_jax.planning import make_plan
from flm_jax.topology import parse_slice


def compile_variant(model_cfg, layout, optimizer_cfg, tpu, batch_size, seq_len, num_microbatches) -> dict:
    plan = make_plan(model_cfg, layout, tpu.num_chips, batch_size, seq_len, num_microbatches)
    row = {
        "remat_policy": model_cfg.remat_policy,
        "attention_impl": model_cfg.attention_impl,
        "estimate_gib": plan["total_gib_per_device"],
    }
    try:
        step = aot.compile_train_step(
            model_cfg, layout, optimizer_cfg, tpu, plan["batch_size"], plan["seq_len"], num_microbatches
        )
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is the result of this row
        return row | {"error": str(e).strip().splitlines()[0][:200]}
    return row | {"compiled": step.report}


def table(rows: list[dict]) -> str:
    lines = [
        "| remat | attention | total / chip | temporaries | estimate | executed FLOPs / chip | step at peak | MFU at "
        "best | compile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['remat_policy']} | {r['attention_impl']} |"
        if "error" in r:
            lines.append(f"{head} does not compile: {r['error']} | | {r['estimate_gib']:.1f} GiB | | | | |")
            continue
        c = r["compiled"]
        fits = "" if c["fits"] else " (over HBM)"
        kernels = "+ kernels" if c.get("uncounted_kernels") else ""  # Pallas kernels declare no FLOPs
        lines.append(
            f"{head} {c['total_gib_per_device']:.1f} GiB{fits} | {c['temp_gib_per_device']:.1f} GiB | "
            f"{r['estimate_gib']:.1f} GiB | {c['flops_per_device']:.3g} {kernels} | {c['step_time_at_peak_s']:.2f} s "
            f"{kernels} | {'' if kernels else format(c['mfu_at_peak'], '.1%')} | {c['compile_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--remat", default=",".join(p for p in REMAT_POLICIES if p != "none"))
    p.add_argument("--attention", default="einsum,splash")
    p.add_argument("--topology", default=None, help="default: the layout's MeshLayout.topology")
    args = cli.parse(p, argv, reads_data=False)
    model_cfg, layout = cli.configured(TeleFLMConfig), cli.configured(MeshLayout)
    tpu = parse_slice(args.topology or layout.topology)
    setting = {k: train_setting(k, None) for k in ("batch_size", "seq_len", "num_microbatches")}
    rows = []
    for attention in args.attention.split(","):
        for remat in args.remat.split(","):
            if attention not in ATTENTION_IMPLS or remat not in REMAT_POLICIES:
                raise SystemExit(f"Unknown variant {remat}/{attention}; {REMAT_POLICIES} x {ATTENTION_IMPLS}.")
            cfg = model_cfg.replace(remat_policy=remat, attention_impl=attention)
            print(f"compiling remat={remat} attention={attention} for {tpu.name} ...", flush=True)
            rows.append(
                compile_variant(
                    cfg,
                    layout,
                    cli.configured(OptimizerConfig),
                    tpu,
                    setting["batch_size"],
                    setting["seq_len"],
                    setting["num_microbatches"] or 1,
                )
            )
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{layout.name}.json").write_text(json.dumps({"topology": tpu.name, "setting": setting, "rows": rows}))
    print(f"\n{layout.name} on {tpu.name}, batch {setting}\n{table(rows)}")


if __name__ == "__main__":
    main()
