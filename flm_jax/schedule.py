"""A growth schedule, Tele-FLM style: `python -m flm_jax.schedule --gin_file=gin/schedules/tiny_teleflm.gin
--workdir=runs/schedule`.

Trains, grows, trains, ... each stage in WORKDIR/stage<i> (flm_jax.growth.schedule). Running it again resumes. At
the end it prints the loss before and after each growth and a table of the stages, and writes WORKDIR/schedule.json
and WORKDIR/schedule.png (loss against step, every stage, growth points marked).
"""

from __future__ import annotations

import json
import time

from flm_jax import cli
from flm_jax.files import atomic_write_text, check_output_folder
from flm_jax.growth.schedule import format_table, plot_schedule, run_schedule, stages
from flm_jax.paths import as_path


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    args = cli.parse(p, argv, reads_data=False)
    plan = stages()
    workdir = as_path(args.workdir)  # absolute: the stages' processes run from the repository root
    check_output_folder(workdir, "--workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = run_schedule(workdir, plan)
    print(format_table(rows), flush=True)
    print(f"schedule wall time {time.time() - started:.0f} s", flush=True)
    atomic_write_text(
        workdir / "schedule.json", json.dumps({"stages": rows, "wall_seconds": time.time() - started}, indent=1)
    )
    plot_schedule(rows, workdir / "schedule.png")


if __name__ == "__main__":
    cli.run_tool("schedule", main)
