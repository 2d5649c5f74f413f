"""Every benchmark script runs from end to end in its smoke mode (toy shapes, a few steps: the figures mean
nothing) and writes the figures its full run reports, so none of them rots between measurements."""

import json
import math
import re
import subprocess
import sys

import pytest

from flm_jax.cli import REPO_ROOT


def check_train_step(r):
    shape = r["shape"]
    for side in ("flm_jax", "torch"):
        s = r["sides"][side]
        assert s["step_time_s"] > 0 and 0 < s["mfu"] < 1
        assert math.isclose(s["tokens_per_sec"], shape["batch_size"] * shape["seq_len"] / s["step_time_s"])
    assert math.isclose(
        r["flm_jax_over_torch"], r["sides"]["flm_jax"]["tokens_per_sec"] / r["sides"]["torch"]["tokens_per_sec"]
    )


def check_bfloat16(r):
    f32, bf16 = r["losses"]["float32"], r["losses"]["bfloat16"]
    assert len(f32) == len(bf16) == r["steps"]
    # bfloat16 took effect (other roundings) on the same initialisation and data (a first loss within 1%).
    assert f32 != bf16 and abs(f32[0] - bf16[0]) < 0.01 * f32[0]
    assert r["within_noise"] == (r["bfloat16_gap"]["second_half_mean"] <= r["seed_gap"]["second_half_mean"])
    assert r["bfloat16_speedup"]["tiny"] > 0  # (the bench-config runs are left out of smoke runs)


def check_compile_time(r):
    two, four = r["depths"]["2"], r["depths"]["4"]
    assert (two["layers"], four["layers"]) == (2, 4) and four["params"] > two["params"]
    assert not two["persistent_cache"] and four["hlo_while_loops"] >= 1
    assert math.isclose(r["compile_ratio_4_over_2"], four["compile_s"] / two["compile_s"])


def check_checkpoint_ops(r):
    (size,) = r["sizes"].values()
    assert size["checkpoint_mib"] > 0
    for op in ("restore_save", "grow", "export"):
        assert size["ops"][op]["seconds"] > 0 and size["ops"][op]["peak_rss_mib"] > 0, op
    assert math.isclose(
        size["grow_over_restore_save"], size["ops"]["grow"]["seconds"] / size["ops"]["restore_save"]["seconds"]
    )


def check_generate_speed(r):
    assert r["params"] > 0 and r["torch_threads"] >= 1
    assert [b["batch_size"] for b in r["batches"]] == [1, 8]
    for b in r["batches"]:
        assert b["flm_jax_tok_s"] > 0 and b["transformers_tok_s"] > 0 and 0 <= b["tokens_agree"] <= 1
        assert math.isclose(b["flm_jax_over_transformers"], b["flm_jax_tok_s"] / b["transformers_tok_s"])
        seconds = r["runs"]["flm_jax"]["batches"][str(b["batch_size"])]["seconds"]
        assert math.isclose(b["flm_jax_tok_s"], b["batch_size"] * r["new_tokens"] / seconds)
        assert math.isclose(b["kv_cache_over_full_recompute"], b["flm_jax_tok_s"] / b["flm_jax_full_recompute_tok_s"])


def check_input_pipeline(r):
    rate = r["consumption"]["tokens_per_sec"]
    assert math.isclose(rate, r["consumption"]["tokens_per_step"] / r["consumption"]["step_time_s"])
    for name in ("seqio", "sft"):
        p = r["pipelines"][name]
        assert p["tokens_per_sec"] > 0 and 0 < p["non_padding"] <= 1
        assert math.isclose(p["over_consumption"], p["tokens_per_sec"] / rate)
    assert r["pipelines"]["sft"]["mixture"] == "flm_instructions"
    for name in ("plan", "train", "export"):
        t = r["tools"][name]
        assert 0 < t["imports_s"] < t["startup_s"] and t["top_imports_s"], name
        # No CUDA or cuInit probing on a CPU host's console (libtpu, which CI installs to compile for TPUs, still
        # reports its missing TPU: docs/performance.md).
        assert not [line for line in t["probe_lines"] if re.search("cuda|cuinit", line, re.I)], t["probe_lines"]
    assert r["tools"]["train"]["setup_s"] < r["tools"]["train"]["first_step_s"]


CHECKS = {
    "train_step": check_train_step,
    "bfloat16": check_bfloat16,
    "compile_time": check_compile_time,
    "checkpoint_ops": check_checkpoint_ops,
    "generate_speed": check_generate_speed,
    "input_pipeline": check_input_pipeline,
}


@pytest.mark.parametrize("script", sorted(CHECKS))
def test_benchmark_smoke_run(script, tmp_path):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", "--smoke", f"--out={out}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["smoke"] is True
    CHECKS[script](results)
