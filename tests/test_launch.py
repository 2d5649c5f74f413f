"""The launch recipes (launch/): the training command each prints under DRY_RUN=1 parses with flm_jax.train's own
flags and its gin files resolve and bind, so a typo in a flag or a gin path fails here rather than on a booked pod;
and the launcher line each would run carries exactly that command. Nothing is trained."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

import gin
from flm_jax import cli
from flm_jax.config import TeleFLMConfig
from flm_jax.partitioning import MeshLayout
from flm_jax.train import build_parser
from flm_jax.training.config import TrainConfig

LAUNCH = cli.REPO_ROOT / "launch"
WORKDIR = "gs://bucket/run"
# The settings each recipe requires (the workdir and experiment come from the test); the model and mesh are left
# to the recipes' defaults, which are what this checks.
REQUIRED = {
    "tpu_pod.sh": {"TPU_NAME": "my-v5p-512", "ZONE": "us-east5-a"},
    "xpk_workload.sh": {"CLUSTER": "my-cluster", "ZONE": "us-east5-a", "DOCKER_IMAGE": "gcr.io/p/flm_jax:tpu"},
    "slurm_gpu.sbatch": {},
}
# recipe -> (model gin, its hidden size, mesh gin, its MeshLayout.name)
DEFAULTS = {
    "tpu_pod.sh": ("gin/models/52b.gin", 8192, "gin/meshes/tpu_v5p_52b.gin", "tpu_v5p_52b"),
    "xpk_workload.sh": ("gin/models/52b.gin", 8192, "gin/meshes/tpu_v5p_52b.gin", "tpu_v5p_52b"),
    "slurm_gpu.sbatch": ("gin/models/1t.gin", 20480, "gin/meshes/h100_1024.gin", "h100_1024"),
}


@pytest.fixture
def experiment(tmp_path):
    # A user's experiment file, with a path holding a space; num_microbatches overrides the 52B mesh's 4, which
    # shows the file is applied after the mesh.
    path = tmp_path / "my runs" / "experiment.gin"
    path.parent.mkdir()
    path.write_text("TrainConfig.steps = 1234\nTrainConfig.num_microbatches = 8\n")
    return path


def dry_run(script: Path, **settings: str) -> subprocess.CompletedProcess:
    # Only PATH and HOME from outside, so a MODEL or ZONE in the caller's environment cannot leak in.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "DRY_RUN": "1", **settings}
    return subprocess.run(["bash", str(script)], env=env, cwd=cli.REPO_ROOT, capture_output=True, text=True)


def commands(recipe: str, experiment: Path, script: Path | None = None) -> tuple[list[str], list[str]]:
    """The training command (stdout) and the launcher command (stderr) of a recipe's dry run, as argv lists."""
    out = dry_run(script or LAUNCH / recipe, WORKDIR=WORKDIR, EXPERIMENT=str(experiment), **REQUIRED[recipe])
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout), shlex.split(out.stderr)


def parse_training(argv: list[str]):
    """argv parsed as `python -m flm_jax.train` parses it, gin files loaded; nothing runs."""
    assert argv[0] in ("python", "python3") and argv[1:3] == ["-m", "flm_jax.train"], argv
    parser = build_parser()
    parser.allow_abbrev = False  # a misspelt prefix such as --multi must not pass for --multihost
    return cli.parse(parser, argv[3:], load=True)


def remote_command(launcher: list[str]) -> list[str]:
    (command,) = [a.removeprefix("--command=") for a in launcher if a.startswith("--command=")]
    return shlex.split(command)


@pytest.mark.parametrize("recipe", sorted(REQUIRED))
def test_training_command_parses_and_its_gin_files_bind(recipe, experiment):
    model_gin, hidden_size, mesh_gin, mesh_name = DEFAULTS[recipe]
    argv, _ = commands(recipe, experiment)
    args = parse_training(argv)
    assert args.multihost is True
    assert args.workdir == WORKDIR
    assert args.gin_file == [model_gin, mesh_gin, str(experiment)]
    assert args.coordinator_address is None and args.until_step is None
    assert gin.query_parameter("MeshLayout.name") == mesh_name
    assert cli.configured(MeshLayout).name == mesh_name
    assert cli.configured(TeleFLMConfig).hidden_size == hidden_size
    train_cfg = cli.configured(TrainConfig)
    assert (train_cfg.steps, train_cfg.num_microbatches) == (1234, 8)


def test_tpu_pod_installs_and_trains_on_every_worker(experiment):
    argv, launcher = commands("tpu_pod.sh", experiment)
    assert launcher[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p-512"]
    assert {"--zone=us-east5-a", "--worker=all"} <= set(launcher)
    remote = remote_command(launcher)
    assert remote[:3] == ["cd", "flm_jax", "&&"]
    install, train = remote[3 : remote.index("&&", 3)], remote[remote.index("&&", 3) + 1 :]
    assert install == [argv[0], "-m", "pip", "install", "-q", "-r", "requirements-tpu.txt"]
    assert train == argv


def test_xpk_workload_asks_for_the_meshs_slice(experiment):
    argv, launcher = commands("xpk_workload.sh", experiment)
    assert launcher[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=my-cluster", "--num-slices=1", "--docker-image=gcr.io/p/flm_jax:tpu"} <= set(launcher)
    assert remote_command(launcher) == ["cd", "/app", "&&", *argv]
    cli.load_gin([DEFAULTS["xpk_workload.sh"][2]], [], reads_data=False)
    assert f"--tpu-type={cli.configured(MeshLayout).topology}" in launcher


def test_slurm_runs_one_process_per_node_on_all_its_gpus(experiment):
    argv, launcher = commands("slurm_gpu.sbatch", experiment)
    # Without JAX_LOCAL_DEVICE_IDS, jax's SLURM detection would give each process only GPU SLURM_LOCALID.
    assert launcher == ["JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", "srun", *argv]
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", (LAUNCH / "slurm_gpu.sbatch").read_text(), re.M))
    assert sbatch["ntasks-per-node"] == "1" and sbatch["gpus-per-node"] == "8"
    cli.load_gin([DEFAULTS["slurm_gpu.sbatch"][2]], [], reads_data=False)
    assert int(sbatch["nodes"]) * int(sbatch["gpus-per-node"]) == cli.configured(MeshLayout).num_devices


@pytest.mark.parametrize("recipe", sorted(REQUIRED))
def test_a_missing_setting_stops_the_recipe_naming_it(recipe, experiment):
    out = dry_run(LAUNCH / recipe, EXPERIMENT=str(experiment), **REQUIRED[recipe])
    assert out.returncode != 0 and "WORKDIR" in out.stderr and not out.stdout


@pytest.mark.parametrize(
    "typo, error",
    [
        (("--multihost", "--multihots"), SystemExit),  # argparse: unrecognized arguments
        (("--multihost", "--multi"), SystemExit),  # a prefix, refused without abbreviations
        (("--workdir=", "--work_dir="), SystemExit),
        (("gin/meshes/tpu_v5p_52b.gin", "gin/meshes/tpu_v5p_52.gin"), FileNotFoundError),
    ],
)
def test_a_typo_in_a_recipe_fails_the_check(typo, error, experiment, tmp_path):
    script = tmp_path / "tpu_pod.sh"
    text = (LAUNCH / "tpu_pod.sh").read_text()
    assert typo[0] in text
    script.write_text(text.replace(typo[0], typo[1]))
    argv, _ = commands("tpu_pod.sh", experiment, script)
    with pytest.raises(error):
        parse_training(argv)
