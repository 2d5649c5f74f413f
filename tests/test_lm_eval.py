"""The lm-evaluation-harness adapter (flm_jax.inference.lm_eval_adapter) and its command line (flm_jax.lm_eval), on a
random-initialised tiny model written as a workdir and the shipped local task flm_prose_choice, offline."""

import jax
import numpy as np
import pytest
import sentencepiece as spm
from lm_eval.api.instance import Instance

from flm_jax.cli import REPO_ROOT
from flm_jax.hf.tokenizer import default_tokenizer_path
from flm_jax.inference.generate import generate
from flm_jax.inference.lm_eval_adapter import FlmJaxLM
from flm_jax.inference.scoring import score_continuations, with_bos
from flm_jax.model import TeleFLM
from flm_jax.optim import OptimizerConfig
from flm_jax.params import init_params
from flm_jax.partitioning import make_mesh
from flm_jax.training.checkpoint import Checkpointer, make_metadata
from flm_jax.training.state import StateSpec, init_state
from tests.helpers import MODEL, SINGLE, run_module

TASKS_DIR = REPO_ROOT / "flm_jax" / "data" / "assets" / "lm_eval_tasks"
TASK = "flm_prose_choice"
SHORT_TEXT = "In the beginning God created the heaven and the earth."
# Longer than MODEL.max_position_embeddings (64) tokens: three rolling windows.
LONG_TEXT = (
    "And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God "
    "moved upon the face of the waters. And God said, Let there be light: and there was light. And God saw the "
    "light, that it was good: and God divided the light from the darkness. And God called the light Day, and the "
    "darkness he called Night. And the evening and the morning were the first day. And God said, Let there be a "
    "firmament in the midst of the waters, and let it divide the waters from the waters. And God made the "
    "firmament, and divided the waters which were under the firmament from the waters which were above the "
    "firmament: and it was so."
)


def _offline_env(tmp_path) -> dict[str, str]:
    """No network, and Hugging Face caches (the json builder's Arrow files) under tmp_path."""
    return {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture
def offline(tmp_path, monkeypatch):
    import datasets

    env = _offline_env(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # `datasets` read its cache location when first imported: point the live value into tmp_path as well.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", env["HF_DATASETS_CACHE"])
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    return env


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(workdir, config, params): a random-initialised MODEL saved as step 0 (no training step)."""
    workdir = tmp_path_factory.mktemp("lm_eval_workdir")
    mesh = make_mesh(SINGLE, jax.devices()[:1])
    spec = StateSpec.build(MODEL, OptimizerConfig(), mesh, SINGLE, total_steps=1)
    params = init_params(MODEL, mesh, SINGLE, jax.random.key(0))
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(0, init_state(params, spec.tx, spec.shardings), {}, make_metadata(MODEL), force=True)
    ckpt.wait()
    ckpt.close()
    return workdir, MODEL, params


@pytest.fixture(scope="module")
def lm(model):
    return FlmJaxLM(workdir=str(model[0]), batch_size=4, max_gen_toks=12)


def _sp():
    return spm.SentencePieceProcessor(model_file=str(default_tokenizer_path()))


def _expected_split(sp, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal convention, written out: trailing whitespace moves to the continuation, the pair is
    encoded whole and split after the context's own tokens; BOS goes first (an empty context is BOS alone)."""
    if not context:
        return with_bos([], MODEL), sp.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = sp.encode(context + continuation), sp.encode(context)
    return with_bos(ctx, MODEL), whole[len(ctx) :]


def _token_logprobs(params, inputs: list[int], targets: list[int]) -> np.ndarray:
    """log p(targets[t] | inputs[:t+1]) from one full forward pass."""
    logits = TeleFLM(MODEL).apply({"params": params}, np.asarray([inputs], np.int32))[0].astype(np.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return np.asarray(logprobs)[np.arange(len(targets)), targets]


def _rolling_reference(params, ids: list[int]) -> float:
    """lm-eval's rolling log-likelihood (context_len=1), from its documented semantics: blocks of L predictions;
    the first block reads BOS + the text, later blocks read the L tokens before their targets (the last block then
    has a full-length input and only its new tokens count)."""
    length, total = MODEL.max_position_embeddings, 0.0
    for start in range(0, len(ids), length):
        end = min(start + length, len(ids))
        inputs = [MODEL.bos_token_id, *ids[: end - 1]] if start == 0 else ids[end - length - 1 : end - 1]
        total += float(_token_logprobs(params, inputs, ids[end - len(inputs) : end])[-(end - start) :].sum())
    return total


def _task_requests() -> list[Instance]:
    """The local task's requests, built by lm-eval (needs the `offline` fixture)."""
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load([TASK])["tasks"][TASK]
    task.build_all_requests(limit=None)
    return task.instances


def test_loglikelihood_matches_flm_scoring(lm, model, offline):
    _, config, params = model
    requests = _task_requests()
    assert len(requests) == 32  # 8 items x 4 choices
    requests.append(Instance("loglikelihood", {}, ("", SHORT_TEXT), len(requests)))  # an empty context
    requests.append(Instance("loglikelihood", {}, ("Let there be ", "light"), len(requests)))  # trailing space
    got = lm.loglikelihood(requests, disable_tqdm=True)
    sp = _sp()
    expected = score_continuations(params, config, [_expected_split(sp, *req.args) for req in requests], 8)
    np.testing.assert_allclose([g[0] for g in got], [e.logprob for e in expected], rtol=0, atol=1e-5)
    assert [g[1] for g in got] == [e.greedy for e in expected]
    assert all(g[0] < 0 for g in got)


def test_loglikelihood_rolling_matches_full_forward(lm, model):
    _, config, params = model
    sp = _sp()
    assert len(sp.encode(SHORT_TEXT)) < config.max_position_embeddings  # one window
    assert len(sp.encode(LONG_TEXT)) > 2 * config.max_position_embeddings  # three windows, the last partial
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate([SHORT_TEXT, LONG_TEXT])]
    got = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    short_ids = sp.encode(SHORT_TEXT)
    short = float(_token_logprobs(params, with_bos(short_ids[:-1], config), short_ids).sum())
    np.testing.assert_allclose(got[0], short, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got[1], _rolling_reference(params, sp.encode(LONG_TEXT)), rtol=1e-6, atol=1e-4)


def test_generate_until_cuts_at_the_first_stop_string(lm, model):
    _, config, params = model
    context = "And God said, Let there be"
    # The reference: flm_jax's greedy decoding of BOS + the context for max_gen_toks=12 tokens (from model_args).
    ids = generate(params, config, [with_bos(_sp().encode(context), config)], 12, 0.0, 0, config.eos_token_id)[0]
    ids = ids.tolist()[: ids.tolist().index(config.eos_token_id)] if config.eos_token_id in ids else ids.tolist()
    free = lm.generate_until([Instance("generate_until", {}, (context, {"until": []}), 0)], disable_tqdm=True)[0]
    assert free == lm.tok_decode(ids)
    assert len(free) >= 6, free
    stop = free[3:5]
    cut = free[: free.index(stop)]
    requests = [
        Instance("generate_until", {}, (context, {"until": [stop], "do_sample": False}), 0),
        Instance("generate_until", {}, (context, {"until": ["\x00never", stop]}), 1),
        Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 2}), 2),
    ]
    got = lm.generate_until(requests, disable_tqdm=True)
    assert got[:2] == [cut, cut]
    assert got[2] == lm.tok_decode(ids[:2])


def test_simple_evaluate_offline(model, offline):
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="flm_jax",
        model_args=f"workdir={model[0]},batch_size=8",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
    )
    metrics = results["results"][TASK]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and 0.0 <= metrics["acc_norm,none"] <= 1.0
    assert results["n-samples"][TASK]["effective"] == 8


def test_command_line(model, tmp_path):
    out = tmp_path / "results"
    proc = run_module(
        "flm_jax.lm_eval",
        "--model_args",
        f"workdir={model[0]},batch_size=8",
        "--tasks",
        TASK,
        "--include_path",
        TASKS_DIR,
        "--limit",
        "2",
        "--output_path",
        out,
        env=_offline_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TASK in proc.stdout and "acc" in proc.stdout
    assert list(out.rglob("results_*.json"))
