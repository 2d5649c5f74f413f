"""Tests of flm_jax.data: tokenizer, snapshot, packing on a hand-made task, resume, TFDS, validation bytes, gin."""

import gzip
import hashlib
import json
import math
import os
import time

import numpy as np
import pytest

import flm_jax.data as data
import gin
from flm_jax.data import corpus, tasks
from flm_jax.data._tf import tf

ASSETS = os.path.join(os.path.dirname(data.__file__), "assets")


def _snapshot_rows(domain):
    """The snapshot read with nothing but gzip and json (independent of flm_jax.data.corpus)."""
    with gzip.open(os.path.join(ASSETS, f"{domain}.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_tokenizer_ids_and_size():
    sp = data.load_sentencepiece()
    assert data.VOCAB_SIZE == sp.vocab_size() == 2048 and data.VOCAB_SIZE % 128 == 0
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = data.get_vocabulary()
    assert (vocab.vocab_size, vocab.pad_id, vocab.eos_id, vocab.unk_id) == (2048, 0, 2, 3)
    text = "def f(x):\n\treturn x  # ünïcode 中文 🙂"  # byte fallback: any text encodes, nothing becomes <unk>
    ids = sp.encode(text)
    assert 3 not in ids and sp.decode(ids) == text
    assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids == vocab.encode(text)
    assert os.path.basename(data.TOKENIZER_PATH) == "tokenizer.model" and os.path.exists(data.TOKENIZER_PATH)


def test_snapshot_matches_manifest_and_split_rule():
    manifest = corpus.load_manifest()
    for domain in data.DOMAINS:
        rows = _snapshot_rows(domain)
        info = manifest["domains"][domain]
        raw = corpus.read_snapshot_bytes(corpus.snapshot_path(domain))
        assert hashlib.sha256(raw).hexdigest() == info["sha256_uncompressed"]
        assert all(r["split"] == corpus.document_split(domain, r["id"]) for r in rows)
        assert len({r["id"] for r in rows}) == len(rows)
        for split in data.SPLITS:
            assert sum(r["split"] == split for r in rows) == info[split]["documents"] > 0
    with open(data.TOKENIZER_PATH, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == manifest["tokenizer"]["sha256"]
    assert sum(os.path.getsize(os.path.join(ASSETS, n)) for n in os.listdir(ASSETS)) < 5_000_000


HANDMADE = ["In the beginning", "God said", "And the earth was without form, and void", "x = 1\n"]


def _handmade_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"text": HANDMADE})


def test_packed_batches_on_handmade_task():
    data.register_function_task("test_handmade", _handmade_fn)
    data.register_function_task("test_handmade", _handmade_fn)  # re-registering replaces, never crashes
    a, b, c, d = (data.load_sentencepiece().encode(t) for t in HANDMADE)
    assert (len(a), len(b), len(c), len(d)) == (5, 3, 12, 5)  # + EOS: 6, 4, 13 (> 10: two chunks), 6
    BOS, EOS = 1, 2
    # Greedy packing in order into rows of 10: [a|b], [c[:10]], [c[10:]|d]; a split document restarts with BOS.
    targets = [a + [EOS] + b + [EOS], c[:10], c[10:] + [EOS] + d + [EOS] + [0]]
    inputs = [[BOS] + a + [BOS] + b, [BOS] + c[:9], [BOS] + c[10:] + [BOS] + d + [0]]
    segment_ids = [[1] * 6 + [2] * 4, [1] * 10, [1] * 3 + [2] * 6 + [0]]
    positions = [list(range(6)) + list(range(4)), list(range(10)), list(range(3)) + list(range(6)) + [0]]
    loss_weights = [[1.0] * 10, [1.0] * 10, [1.0] * 9 + [0.0]]

    val = data.validation_set("test_handmade", batch_size=2, seq_len=10, split="train")
    assert len(val.batches) == 2  # 3 rows: the second batch is padded with an all-zero row
    got = {k: np.concatenate([batch[k] for batch in val.batches]) for k in val.batches[0]}
    np.testing.assert_array_equal(got["targets"], targets + [[0] * 10])
    np.testing.assert_array_equal(got["inputs"], inputs + [[0] * 10])
    np.testing.assert_array_equal(got["segment_ids"], segment_ids + [[0] * 10])
    np.testing.assert_array_equal(got["positions"], positions + [[0] * 10])
    np.testing.assert_array_equal(got["loss_weights"], loss_weights + [[0.0] * 10])
    assert {k: v.dtype for k, v in got.items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "loss_weights": np.float32,
    }
    assert val.num_documents == 4 and val.num_tokens == 6 + 4 + 13 + 6
    assert val.num_bytes == sum(len(t.encode("utf-8")) for t in HANDMADE)

    # The training iterator yields the same rows (unshuffled, one epoch, full batches only).
    it = data.BatchIterator("test_handmade", "train", batch_size=2, seq_len=10, shuffle=False, repeat=False)
    batches = list(it)
    assert len(batches) == 1 and it.batches_consumed == 1
    np.testing.assert_array_equal(batches[0]["inputs"], inputs[:2])
    np.testing.assert_array_equal(batches[0]["targets"], targets[:2])


def test_resume_continues_at_the_next_batch():
    full = data.BatchIterator("flm_default", "train", batch_size=2, seq_len=64, seed=7)
    expected = [next(full) for _ in range(3)]
    state = json.loads(json.dumps(full.state()))  # checkpointed after 3 batches, as JSON
    expected += [next(full) for _ in range(3)]
    assert state["batches_consumed"] == 3 and state["name"] == "flm_default" and state["seed"] == 7
    resumed = data.BatchIterator.from_state(state)  # rebuilt from scratch: same seed, same stream
    for want in expected[3:]:
        got = next(resumed)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert resumed.state() == {**state, "batches_consumed": 6}
    assert not np.array_equal(expected[3]["targets"], expected[4]["targets"])


def _resume_seconds(state, snapshots):
    """CPU seconds of this process (all its threads) to rebuild a stream from its checkpointed state and draw the
    next batch, the best of two: CPU time, not wall time, so that the other test worker sharing the cores does not
    count."""
    times = []
    for _ in range(2):
        start = time.process_time()
        batch = next(data.ShardedBatches.from_state(state, (0, 1), snapshots))
        times.append(time.process_time() - start)
    return min(times), batch


def test_resume_from_iterator_snapshots_costs_the_same_at_any_step():
    """Resume without replay: a tf.data snapshot restores the position at step 2000 as fast as at step 20, and
    the next batch is bitwise the uninterrupted one's. Two input shards of the global batch, read side by side."""
    stream = data.ShardedBatches(data.ShardedSpec("flm_default", "train", 8, 32, 0, num_shards=2), (0, 1))
    saved = {}
    for step in range(1, 2001):
        next(stream)
        if step in (20, 2000):
            saved[step] = (json.loads(json.dumps(stream.state())), stream.iterator_states())
    following = next(stream)
    assert saved[2000][0]["batches_consumed"] == 2000 and sorted(saved[2000][1]) == [0, 1]
    early, _ = _resume_seconds(*saved[20])
    late, resumed = _resume_seconds(*saved[2000])
    # measured alone (CPU seconds): 2.77 and 2.80 (1.01); rebuilding and skipping, the resume before snapshots:
    # 4.56 and 9.68 (2.12), which this bound fails
    assert late / early < 1.3, (early, late)
    for k in following:
        np.testing.assert_array_equal(resumed[k], following[k])
    # the two shards are different documents: the rows of shard 0 and shard 1 differ
    assert not np.array_equal(following["targets"][:4], following["targets"][4:])


def test_a_stream_resumed_by_skipping_saves_snapshots_that_resume_it_again():
    """A checkpoint without snapshots (written before they existed, or of input shards another process read)
    resumes by skipping; the snapshots the resumed run saves must restore into a graph that matches them."""
    spec = data.ShardedSpec("flm_default", "train", 4, 32, 0)
    uninterrupted = data.ShardedBatches(spec, (0,))
    expected = [next(uninterrupted) for _ in range(5)]
    skipped = data.ShardedBatches(spec, (0,), batches_consumed=2)
    np.testing.assert_array_equal(next(skipped)["targets"], expected[2]["targets"])
    resumed = data.ShardedBatches.from_state(skipped.state(), (0,), skipped.iterator_states())
    assert resumed.restored_shards == (0,)
    for want in expected[3:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_validation_bytes_match_an_independent_count():
    rows = [r for r in _snapshot_rows("code") if r["split"] == "validation"]
    val = data.validation_set("flm_code", batch_size=8, seq_len=256)
    assert val.num_bytes == sum(len(r["text"].encode("utf-8")) for r in rows)
    assert val.num_documents == len(rows)
    sp = data.load_sentencepiece()  # every document's tokens (+ EOS) are in the batches exactly once
    assert val.num_tokens == sum(len(sp.encode(r["text"])) + 1 for r in rows)
    assert all(b["targets"].shape == (8, 256) for b in val.batches)
    assert sum(int((b["targets"] == data.EOS_ID).sum()) for b in val.batches) >= len(rows)


def test_minival_is_the_first_validation_documents_up_to_its_byte_budget():
    for domain in data.DOMAINS:
        rows = [r for r in _snapshot_rows(domain) if r["split"] == "validation"]
        sizes = [len(r["text"].encode("utf-8")) for r in rows]
        n = max(1, max(k for k in range(len(rows) + 1) if sum(sizes[:k]) <= corpus.MINIVAL_BYTES))
        val = data.validation_set(f"flm_{domain}", batch_size=8, seq_len=256, split=corpus.MINIVAL)
        assert val.num_documents == n < len(rows) and val.num_bytes == sum(sizes[:n])
        sp = data.load_sentencepiece()
        assert val.num_tokens == sum(len(sp.encode(r["text"])) + 1 for r in rows[:n])


def test_bits_per_byte():
    assert data.bits_per_byte(math.log(2) * 300, 100) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        data.bits_per_byte(1.0, 0)


def test_tfds_source_reads_the_prepared_corpus(tmp_path):
    data_dir = data.prepare_tfds(str(tmp_path), domains=("code",))
    data.prepare_tfds(data_dir, domains=("code",))  # already prepared: a no-op
    name = data.register_tfds_task("test_tfds_code", data.tfds_name("code"), data_dir=data_dir)
    rows = [r for r in _snapshot_rows("code") if r["split"] == "validation"]
    assert tasks.source_text_stats(name, "validation") == (len(rows), sum(len(r["text"].encode()) for r in rows))
    import seqio

    source = seqio.get_mixture_or_task(name).source
    texts = sorted(
        ex["text"].decode() for ex in source.get_dataset(split="validation", shuffle=False).as_numpy_iterator()
    )
    assert texts == sorted(r["text"] for r in rows)
    batch = next(data.BatchIterator(name, "train", batch_size=2, seq_len=32, seed=0))
    assert batch["targets"].shape == (2, 32) and batch["inputs"][0, 0] == data.BOS_ID


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()
    data.register_default_tasks()  # back to the default rates


def test_gin_registration(tmp_path, clean_gin):
    import seqio

    docs = {"train": ["héllo wörld", "second document\nwith two lines"], "validation": ["naïve café"]}
    for split, texts in docs.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"body": t, "n": 1}) + "\n" for t in texts))
    gin.parse_config(f"""
      my_docs/register_jsonl_task.name = 'test_gin_docs'
      my_docs/register_jsonl_task.split_to_filepattern = {{
          'train': '{tmp_path}/train.jsonl', 'validation': '{tmp_path}/validation.jsonl'}}
      my_docs/register_jsonl_task.text_key = 'body'
      register_mixture.name = 'test_gin_mix'
      register_mixture.tasks_and_rates = [('flm_code', 1.0), ('test_gin_docs', 3.0)]
      register_default_tasks.mixture_rates = {{'flm_prose': 1.0, 'flm_code': 1.0}}
      register_tasks.registrations = [@my_docs/register_jsonl_task(), @register_mixture()]
  """)
    names = data.register_tasks()
    assert names == ["flm_prose", "flm_code", "flm_default", "test_gin_docs", "test_gin_mix"]
    assert data.register_tasks() == names  # idempotent
    assert seqio.get_mixture_or_task("flm_default").get_rate(seqio.get_mixture_or_task("flm_prose")) == 1.0
    val = data.validation_set("test_gin_docs", batch_size=1, seq_len=16)
    assert val.num_bytes == len("naïve café".encode()) and val.num_documents == 1
    batch = next(data.BatchIterator("test_gin_mix", "train", batch_size=2, seq_len=32, seed=1))
    assert batch["targets"].shape == (2, 32)


def test_tensorflow_sees_no_gpu():
    assert tf.config.get_visible_devices("GPU") == []
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") is not None
