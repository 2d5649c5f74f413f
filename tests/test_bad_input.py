"""Bad input to every tool, in one table: each case exits with status 2 and one line that names the problem and
the fix, prints no traceback, and leaves every file and folder on disk as it was (inputs included).

The tools run in-process under `cli.run_tool` (a subprocess would spend seconds importing TensorFlow and JAX per
case). The shared inputs (a tiny checkpoint, the same checkpoint mid-way through a growth ramp, its Hugging Face
export) are built once; a case that damages one works on its own copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gin
from flm_jax import cli, evaluate, export, generate, grow, import_hf, lm_eval, plan, schedule, train
from flm_jax.hf.export import export as export_hf
from flm_jax.params import init_params
from flm_jax.partitioning import make_mesh, replicated
from flm_jax.training.checkpoint import Checkpointer, make_metadata
from flm_jax.training.state import StateSpec, init_state
from tests.helpers import FAST_OPTIMIZER, MODEL, MODEL_FLAGS, RAMP, SINGLE

TOOLS = {
    "train": train.main,
    "grow": grow.main,
    "export": export.main,
    "import_hf": import_hf.main,
    "generate": generate.main,
    "evaluate": evaluate.main,
    "lm_eval": lm_eval.main,
    "plan": plan.main,
    "schedule": schedule.main,
}
# Grouped kv heads (2 groups of 2), so that a growth can break them.
CONFIG = MODEL.replace(num_key_value_heads=2)
FLAGS = [*MODEL_FLAGS, "--gin.TeleFLMConfig.num_key_value_heads=2"]
STEP = 2  # under RAMP: mid-ramp, mask 0.2


def metadata_file(workdir: Path) -> Path:
    return workdir / "checkpoints" / str(STEP) / "metadata" / "metadata"


def edit_metadata(workdir: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads(metadata_file(workdir).read_text())
    edit(meta)
    metadata_file(workdir).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The shared inputs: `ckpt` (a step-2 checkpoint of CONFIG), `ramp` (the same mid-way through a growth
    ramp), `hf` (its llama export)."""
    root = tmp_path_factory.mktemp("inputs")
    mesh = make_mesh(SINGLE, jax.devices()[:1])
    spec = StateSpec.build(CONFIG, FAST_OPTIMIZER, mesh, SINGLE, STEP + 1)
    state = init_state(init_params(CONFIG, mesh, SINGLE, jax.random.key(0)), spec.tx, spec.shardings)
    state["step"] = jax.device_put(jnp.asarray(STEP, jnp.int32), replicated(mesh))
    ckpt = Checkpointer(root / "ckpt", async_save=False)
    ckpt.save(STEP, state, {}, make_metadata(CONFIG), force=True)
    ckpt.close()
    shutil.copytree(root / "ckpt", root / "ramp")
    edit_metadata(root / "ramp", lambda meta: meta.update(growth=RAMP))
    export_hf(root / "ckpt", root / "hf", "llama", tokenizer="none", progress=lambda _: None)
    return {"ckpt": root / "ckpt", "ramp": root / "ramp", "hf": root / "hf"}


# --- setups: each makes what a case needs inside its own folder `tmp` (copies of the shared inputs) ---


def copy(name: str, edit: Callable[[Path], None] | None = None) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, inputs: dict[str, Path]) -> None:
        shutil.copytree(inputs[name], tmp / name)
        if edit:
            edit(tmp / name)

    return setup


def file_at(name: str, text: str = "a file\n") -> Callable[[Path, dict], None]:
    def setup(tmp: Path, inputs: dict[str, Path]) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)

    return setup


def read_only(tmp: Path, inputs: dict[str, Path]) -> None:
    """tmp/ro: a folder nobody may write to (root included: the immutable flag where the filesystem has one)."""
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(tmp / "ro")], capture_output=True)
    if os.access(tmp / "ro", os.W_OK):
        pytest.skip("cannot make a folder read-only here (root without chattr)")


def undo_read_only(tmp: Path) -> None:
    if (tmp / "ro").exists():
        subprocess.run(["chattr", "-i", str(tmp / "ro")], capture_output=True)
        (tmp / "ro").chmod(0o755)


def delete_array_file(workdir: Path) -> None:
    data = sorted((workdir / "checkpoints" / str(STEP) / "state").rglob("d/*"), key=lambda p: -p.stat().st_size)
    data[0].unlink()  # the largest: the parameters' data


def hf_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        tensors = load_file(str(folder / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(folder / "model.safetensors"))

    return damage


def hf_config(**changes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return damage


class RunsCode:
    """Pickles as a call of os.system (creating a file the snapshot would see): what no import may run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def pickled_code(tmp: Path, inputs: dict[str, Path]) -> None:
    """tmp/bin: a PyTorch-weights folder whose pytorch_model.bin holds, besides tensors, pickled code."""
    import torch

    (tmp / "bin").mkdir()
    shutil.copy(inputs["hf"] / "config.json", tmp / "bin")
    tensors = {k: torch.from_numpy(v) for k, v in load_file(str(inputs["hf"] / "model.safetensors")).items()}
    torch.save({**tensors, "extra": RunsCode(tmp / "code_ran")}, tmp / "bin" / "pytorch_model.bin")


def chat_file(tmp: Path, inputs: dict[str, Path]) -> None:
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    (tmp / "chat.jsonl").write_text(json.dumps(good) + "\n" + '{"messages": [{"role": "user", "content": "Hi"\n')


@dataclasses.dataclass(frozen=True)
class Case:
    tool: str
    argv: tuple[str, ...]  # '{tmp}' is the case's folder; '{ckpt}', '{ramp}', '{hf}' the shared inputs
    match: str  # what the error line must say: the problem and the fix
    setup: Callable[[Path, dict], None] | None = None


GROW = ("--from_workdir={ckpt}", "--workdir={tmp}/grown")
EXPORT = ("--out={tmp}/out", "--tokenizer=none")
IMPORT = ("--hf_dir={tmp}/hf", "--workdir={tmp}/run")
EVALUATE = ("--workdir={ckpt}", "--out={tmp}/eval.json")
# train creates WORKDIR and WORKDIR/checkpoints before it checks the run (flm_jax/training/loop.py: train()).
LM_EVAL_TASKS = str(cli.REPO_ROOT / "flm_jax" / "data" / "assets" / "lm_eval_tasks")
CASES = {
    # gin: files, configurables, bindings, values
    "unknown gin file": Case(
        "train",
        ("--gin_file=gin/models/nope.gin", "--workdir={tmp}/run"),
        r"gin file 'gin/models/nope.gin' not found .* Pass a path such as gin/models/52b.gin",
    ),
    "include of a missing gin file": Case(
        "plan",
        ("--gin_file={tmp}/my.gin",),
        r"gin \(.*my.gin\): Unable to open file: gin/nope.gin.* Fix the include's path",
        file_at("my.gin", "include 'gin/nope.gin'\n"),
    ),
    "unknown configurable": Case(
        "train",
        (*FLAGS, "--gin.TrainConfg.steps=5", "--workdir={tmp}/run"),
        r"gin \(--gin.TrainConfg.steps=5\): No configurable matching 'TrainConfg'\. Check the spelling",
    ),
    "unknown binding": Case(
        "train",
        (*FLAGS, "--gin.TrainConfig.stepz=5", "--workdir={tmp}/run"),
        r"doesn't have a parameter named 'stepz'\. Did you mean 'steps'\? TrainConfig takes steps, batch_size",
    ),
    "unquoted string binding": Case(
        "train",
        (*FLAGS, "--gin.TrainConfig.mixture=flm_default", "--workdir={tmp}/run"),
        r"mixture=flm_default\): the value is not a Python literal\. Write the value as a Python literal: quote",
    ),
    "binding of the wrong type": Case(
        "train",
        (*FLAGS, "--gin.TrainConfig.steps='ten'", "--workdir={tmp}/run"),
        r"TrainConfig.steps='ten' is str, not an integer: fix the binding .* e\.g\. --gin.TrainConfig.steps=10$",
    ),
    "float binding of the wrong type": Case(
        "plan",
        (*FLAGS, "--gin.TeleFLMConfig.rms_norm_eps='small'"),
        r"TeleFLMConfig.rms_norm_eps='small' is str, not a number: .* --gin.TeleFLMConfig.rms_norm_eps=1e-3$",
    ),
    "growth binding of the wrong type": Case(
        "grow",
        (*GROW, "--gin.GrowthSpec.hidden_size='wide'"),
        r"GrowthSpec.hidden_size='wide' is str, not an integer or None",
    ),
    "mesh binding of the wrong type": Case(
        "plan",
        (*FLAGS, "--gin.MeshLayout.mesh_shape=8"),
        r"MeshLayout.mesh_shape=8 is int, not a dict",
    ),
    "binding without a value": Case("plan", (*FLAGS, "--gin.TrainConfig.steps"), r"needs a value: --gin.TrainConfig"),
    "no model gin file": Case("plan", (), r"Required bindings .* Include a model gin file, e\.g\. --gin_file="),
    # workdirs and output folders
    "train workdir is a file": Case(
        "train",
        (*FLAGS, "--workdir={tmp}/run"),
        r"--workdir .*run is a file, not a folder",
        file_at("run"),
    ),
    "grow into a file": Case(
        "grow", GROW, r"--workdir .*grown is a file, not a folder; pass the path of a folder", file_at("grown")
    ),
    "grow into a read-only folder": Case(
        "grow",
        (GROW[0], "--workdir={tmp}/ro/grown"),
        r"--workdir .*ro/grown is not writable: .* Choose a folder you can write to",
        read_only,
    ),
    "grow into a non-empty folder": Case(
        "grow",
        GROW,
        r"is not empty; grow never writes over a run\. Choose an empty folder or pass --overwrite",
        file_at("grown/notes.txt"),
    ),
    "import into a workdir with checkpoints": Case(
        "import_hf",
        ("--hf_dir={hf}", "--workdir={tmp}/ckpt"),
        r"already holds checkpoints; import into a new workdir",
        copy("ckpt"),
    ),
    "import into a read-only folder": Case(
        "import_hf", ("--hf_dir={hf}", "--workdir={tmp}/ro/run"), r"ro/run is not writable: .* Choose", read_only
    ),
    "export into a non-empty folder": Case(
        "export", ("--workdir={ckpt}", *EXPORT), r"out is not empty; pass --overwrite", file_at("out/notes.txt")
    ),
    "export into a file": Case(
        "export", ("--workdir={ckpt}", *EXPORT), r"--out .*out is a file, not a folder", file_at("out")
    ),
    "evaluate into a folder": Case(
        "evaluate",
        ("--workdir={ckpt}", "--out={tmp}/out"),
        r"--out .*out is a folder; pass the path of the JSON file to write, e\.g\. .*out/eval\.json",
        file_at("out/notes.txt"),
    ),
    # checkpoints
    "not a workdir": Case(
        "export", ("--workdir={tmp}", *EXPORT), r"has no checkpoints/ folder: is it a flm_jax workdir"
    ),
    "no such step": Case(
        "export", ("--workdir={ckpt}", "--step=7", *EXPORT), r"has no step 7; it has steps \[2\]: pass one of them"
    ),
    "shapes disagree with the config": Case(
        "export",
        ("--workdir={tmp}/ckpt", *EXPORT),
        r"stored parameters do not match the model config .*/down_proj \[2, 128, 64\] \(config: \[2, 256, 64\]\)"
        r".* restore the checkpoint from a copy",
        copy("ckpt", lambda w: edit_metadata(w, lambda m: m["model_config"].update(intermediate_size=256))),
    ),
    "resume with another shape": Case(
        "train",
        (*FLAGS, "--gin.TeleFLMConfig.hidden_size=128", "--workdir={tmp}/ckpt"),
        r"another model shape than the config: hidden_size: checkpoint 64 vs config 128\. Use a new --workdir",
        copy("ckpt"),
    ),
    "missing array file": Case(
        "export",
        ("--workdir={tmp}/ckpt", *EXPORT),
        r"parameter .* cannot be read from .*: the checkpoint is damaged .* Restore it from a copy",
        copy("ckpt", delete_array_file),
    ),
    "damaged metadata": Case(
        "generate",
        ("--workdir={tmp}/ckpt", "--prompt=hi"),
        r"checkpoints/2/metadata is damaged \(JSONDecodeError: .*\); restore the checkpoint from a copy",
        copy("ckpt", lambda w: metadata_file(w).write_text('{"format": "flm_jax/1", "model_con')),
    ),
    "resume from damaged metadata": Case(
        "train",
        (*FLAGS, "--workdir={tmp}/ckpt"),
        r"checkpoints/2/metadata is damaged .* restore the checkpoint from a copy",
        copy("ckpt", lambda w: metadata_file(w).write_text('{"format": "flm_jax/1", "model_con')),
    ),
    # growth
    "grow to a smaller shape": Case(
        "grow", (*GROW, "--gin.GrowthSpec.hidden_size=32"), r"never shrinks a model\. Choose a size >= the source's"
    ),
    "grow to another head_dim": Case(
        "grow",
        (*GROW, "--gin.GrowthSpec.hidden_size=128"),
        r"changes head_dim from 16 to 32; .* Set num_attention_heads = hidden_size / 16",
    ),
    "grow breaks kv groups": Case(
        "grow",
        (*GROW, "--gin.GrowthSpec.hidden_size=80", "--gin.GrowthSpec.num_attention_heads=5"),
        r"num_attention_heads=5 breaks the kv groups of 2 query heads; grow heads by a multiple of 2",
    ),
    "grow mid-ramp": Case(
        "grow", ("--from_workdir={ramp}", "--workdir={tmp}/grown"), r"middle of a growth ramp .* train past the ramp"
    ),
    "grow from a folder without checkpoints": Case(
        "grow", ("--from_workdir={tmp}/nowhere", "--workdir={tmp}/grown"), r"nowhere has no checkpoints/ folder"
    ),
    # export and generation
    "export mid-ramp": Case(
        "export", ("--workdir={ramp}", *EXPORT), r"middle of a growth mask ramp \(mask 0.2\).* Use a checkpoint from"
    ),
    "generate mid-ramp": Case(
        "generate", ("--workdir={ramp}", "--prompt=hi"), r"middle of a growth mask ramp \(mask 0.2\).* Use a checkpoint"
    ),
    "lm_eval of a mid-ramp checkpoint": Case(
        "lm_eval",
        ("--model_args", "workdir={ramp}", "--tasks", "flm_prose_choice", "--include_path", LM_EVAL_TASKS),
        r"middle of a growth mask ramp \(mask 0.2\).* Use a checkpoint",
    ),
    "generate chat with a plain model": Case(
        "generate", ("--workdir={ckpt}", "--prompt=hi", "--chat"), r"--chat needs a model fine-tuned with the chat"
    ),
    "export with a bad shard size": Case(
        "export",
        ("--workdir={ckpt}", "--max_shard_size=lots", *EXPORT),
        r"size 'lots' is not a number of bytes such as 5GB",
    ),
    "export with a missing tokenizer": Case(
        "export",
        ("--workdir={ckpt}", "--out={tmp}/out", "--tokenizer={tmp}/sp.model"),
        r"--tokenizer .*sp.model not found: pass a SentencePiece model, or none to skip it",
    ),
    # Hugging Face folders
    "missing tensor": Case(
        "import_hf",
        IMPORT,
        r"does not match its config.json: missing: model\.layers\.1\.mlp\.up_proj\.weight",
        copy("hf", hf_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))),
    ),
    "misshapen tensor": Case(
        "import_hf",
        IMPORT,
        r"wrong shape: model\.layers\.0\.self_attn\.k_proj\.weight \[16, 64\] \(expected \[32, 64\]\)",
        copy("hf", hf_tensors(lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64))}))),
    ),
    "unknown architecture": Case(
        "import_hf",
        IMPORT,
        r"model_type 'gpt2' \(architectures \['GPT2LMHeadModel'\]\); import reads 'llama' .* pass a folder of one",
        copy("hf", hf_config(model_type="gpt2", architectures=["GPT2LMHeadModel"])),
    ),
    "damaged config.json": Case(
        "import_hf",
        IMPORT,
        r"hf/config.json is not valid JSON \(.*\); fix it or download it again",
        copy("hf", lambda f: (f / "config.json").write_text('{"model_type": "llama",')),
    ),
    "truncated safetensors file": Case(
        "import_hf",
        IMPORT,
        r"model.safetensors is not a readable safetensors file \(.*\); download or export it again",
        copy("hf", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100])),
    ),
    "PyTorch weights with pickled code": Case(
        "import_hf",
        ("--hf_dir={tmp}/bin", "--workdir={tmp}/run"),
        r"pytorch_model.bin holds pickled objects besides tensors, which are never loaded \(.*GLOBAL \w+\.system"
        r".*\); convert the weights to safetensors from a copy you trust",
        pickled_code,
    ),
    "evaluate a broken Hugging Face folder": Case(
        "evaluate",
        ("--hf_dir={tmp}/hf", "--out={tmp}/eval.json"),
        r"missing: model\.norm\.weight",
        copy("hf", hf_tensors(lambda t: t.pop("model.norm.weight"))),
    ),
    # meshes and batches
    "mesh larger than the host": Case(
        "import_hf",
        ("--hf_dir={hf}", "--workdir={tmp}/run", "--gin.MeshLayout.mesh_shape={'data': 16}"),
        r"needs 16 devices but 8 are available\. Set one mesh_shape size to -1 or change the sizes",
    ),
    "mesh does not divide the devices": Case(
        "generate",
        ("--workdir={ckpt}", "--prompt=hi", "--gin.MeshLayout.mesh_shape={'data': 3, 'fsdp': -1}"),
        r"8 devices cannot be split into a mesh .* the fixed axes need a multiple of 3",
    ),
    "mesh does not divide a dimension": Case(
        "import_hf",
        (
            "--hf_dir={hf}",
            "--workdir={tmp}/run",
            "--gin_file=gin/meshes/fsdp_tp.gin",
            "--gin.MeshLayout.mesh_shape={'fsdp': 1, 'tensor': 8}",
        ),
        r"kv_heads', size 2\) is not divisible by .* total size 8\. Make TeleFLMConfig.num_key_value_heads a multiple",
    ),
    "batch does not divide the mesh": Case(
        "evaluate",
        (*EVALUATE, "--gin_file=gin/meshes/data_parallel.gin", "--batch_size=3"),
        r"batch_size=3 is not a multiple of the mesh's batch split \(8, .* pass a multiple of 8 \(--batch_size\)",
    ),
    "train batch does not divide the mesh": Case(
        "train",
        (*FLAGS, "--gin_file=gin/meshes/data_parallel.gin", "--gin.TrainConfig.batch_size=3", "--workdir={tmp}/run"),
        r"batch_size=3 must be a multiple of the mesh's batch split \(8\)",
    ),
    # data
    "unknown data task": Case(
        "evaluate",
        (*EVALUATE, "--mixture=nope"),
        r"'nope' is neither a registered task nor a mixture; registered: \[.*'flm_prose'.*\]\. Use one of them",
    ),
    "train on an unknown task": Case(
        "train",
        (*FLAGS, "--gin.TrainConfig.mixture='nope'", "--workdir={tmp}/run"),
        r"'nope' is neither a registered task nor a mixture",
    ),
    "SFT JSONL with a broken line": Case(
        "evaluate",
        (*EVALUATE, "--chat_file={tmp}/chat.jsonl"),
        r"chat.jsonl:2: bad_json: not valid JSON .* \(fix the record",
        chat_file,
    ),
    "missing text file": Case(
        "evaluate", (*EVALUATE, "--text_file={tmp}/none.txt"), r"--text_file .*none.txt does not exist"
    ),
    # plan and schedule
    "topology without --compile": Case(
        "plan", (*FLAGS, "--topology=v5p-8"), r"--topology is the slice .* add --compile"
    ),
    "schedule stage with an unknown gin file": Case(
        "schedule",
        ("--workdir={tmp}/sched", "--gin.stages.stages=[{'steps': 2, 'gin_files': ['gin/nope.gin']}]"),
        r"stage 1 of stages.stages: gin file 'gin/nope.gin' not found .* Fix its path in the schedule gin file",
    ),
}


def fill(arg: str, **paths: Path) -> str:
    for name, path in paths.items():
        arg = arg.replace("{" + name + "}", str(path))
    return arg


def snapshot(*roots: Path) -> dict[tuple[str, str], tuple]:
    """Every folder and every file (size, sha256, mtime) under the roots, by (root, relative path)."""
    entries = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            key = (str(root), str(path.relative_to(root)))
            if path.is_dir():
                entries[key] = ("folder",)
            else:
                stat = path.stat()
                entries[key] = (stat.st_size, hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_mtime_ns)
    return entries


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, inputs, tmp_path, capsys, monkeypatch):
    gin.clear_config()
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # lm_eval's main sets it for lm-eval's own parser
    tmp = tmp_path / "case"
    tmp.mkdir()
    try:
        if case.setup:
            case.setup(tmp, inputs)
        argv = [fill(a, tmp=tmp, **inputs) for a in case.argv]
        before = snapshot(tmp, *inputs.values())
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.run_tool(case.tool, lambda: TOOLS[case.tool](argv))
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert exit_info.value.code == 2, err
        assert re.search(case.match, err.strip().splitlines()[-1]), err
        assert snapshot(tmp, *inputs.values()) == before
    finally:
        undo_read_only(tmp)
