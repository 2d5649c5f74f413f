"""The tokenizer files of a Hugging Face export, built offline from the SentencePiece model.

Recipe (docs/stack.md, transformers 5): `LlamaTokenizer(vocab_file=...)` gives an empty vocabulary and
`LlamaTokenizer.from_pretrained` mis-tokenises some strings in transformers 5; what matches SentencePiece is
AutoTokenizer on a folder holding the file as `tokenizer.model`, then `save_pretrained` (tokenizer.json). The export
keeps tokenizer.model next to it (llama.cpp's converter and SentencePiece users read it) and names the class
PreTrainedTokenizerFast, which transformers 4 and 5 both load from tokenizer.json.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from flm_jax.config import TeleFLMConfig

# Strings that exercise whitespace runs, newlines, digits, code and byte fallback.
CHECK_TEXTS = (
    "In the beginning God created the heaven and the earth.",
    "  two leading spaces,\ttab and\n\nnewlines ",
    "def f(x):\n    return x ** 2  # 12345\n",
    "Unicode: é ü 中文 🤖 — done.",
)


def default_tokenizer_path() -> Path:
    """flm_jax.data.TOKENIZER_PATH, found without importing flm_jax.data (which starts TensorFlow)."""
    spec = importlib.util.find_spec("flm_jax.data")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / "tokenizer.model"


def save_tokenizer(out_dir: str | Path, sp_model: str | Path, config: TeleFLMConfig) -> None:
    """Write tokenizer.json, tokenizer_config.json and tokenizer.model into out_dir, then check them."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    pad = sp.id_to_piece(config.pad_token_id)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(sp_model, Path(tmp) / "tokenizer.model")
        tokenizer = AutoTokenizer.from_pretrained(tmp, pad_token=pad, add_bos_token=True, local_files_only=True)
        tokenizer.save_pretrained(str(out_dir))
    shutil.copyfile(sp_model, out_dir / "tokenizer.model")
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    check_tokenizer(out_dir, sp_model, config.bos_token_id)


def check_tokenizer(hf_dir: str | Path, sp_model: str | Path, bos_id: int, texts=CHECK_TEXTS) -> None:
    """Raise unless the saved tokenizer, reloaded offline, gives [bos] + SentencePiece's ids for every text."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    for text in texts:
        got, want = tokenizer(text)["input_ids"], [bos_id] + sp.encode(text)
        if got != want:
            raise RuntimeError(f"the exported tokenizer disagrees with SentencePiece on {text!r}: {got} vs {want}")
