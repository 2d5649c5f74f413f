"""The committed SentencePiece tokenizers: ids, training recipe and the seqio vocabularies.

`tokenizer.model` (2048 pieces) is the pretraining tokenizer; `chat_tokenizer.model` is the same model with the
two chat markers appended as user-defined pieces (ids 2048, 2049), so every pretraining id is unchanged.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterable

import sentencepiece as spm

# isort: split  (TensorFlow's settings in flm_jax.data._tf apply before seqio / tfds import it)
import seqio  # noqa: E402
from sentencepiece import sentencepiece_model_pb2

from flm_jax.data import _tf  # noqa: F401  (TF settings before seqio imports it)
from flm_jax.data.corpus import ASSETS_DIR

TOKENIZER_PATH = os.path.join(ASSETS_DIR, "tokenizer.model")
VOCAB_SIZE = 2048  # a multiple of 128
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # Tele-FLM's special ids

# Tele-FLM's chat template: '<_user>' + user text + '<_bot>', then the answer and EOS (see flm_jax/data/chat.py).
# The chat tokenizer appends the markers to the pretraining model as USER_DEFINED pieces: never split into bytes,
# matched wherever they occur in a text, and every other piece keeps its id, score and type.
CHAT_TOKENIZER_PATH = os.path.join(ASSETS_DIR, "chat_tokenizer.model")
USER_MARKER, BOT_MARKER = "<_user>", "<_bot>"
CHAT_MARKERS = (USER_MARKER, BOT_MARKER)
USER_ID, BOT_ID = VOCAB_SIZE, VOCAB_SIZE + 1  # 2048, 2049
CHAT_VOCAB_SIZE = VOCAB_SIZE + len(CHAT_MARKERS)  # 2050: a model fine-tuned with it needs vocab_size >= this

# Llama-style BPE: identity normalisation (whitespace kept, so code survives), digits split, byte fallback
# (any UTF-8 text encodes). Trained on whole documents, so pieces may hold newlines (e.g. '):\n'); no dummy
# prefix, so a line start looks the same in training and in encoding. One thread, all sentences in order,
# no sampling: training is deterministic.
TRAINER_OPTIONS = dict(
    model_type="bpe",
    vocab_size=VOCAB_SIZE,
    pad_id=PAD_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    pad_piece="<pad>",
    bos_piece="<s>",
    eos_piece="</s>",
    unk_piece="<unk>",
    byte_fallback=True,
    character_coverage=0.9999,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    max_sentencepiece_length=16,
    max_sentence_length=1 << 17,  # bytes; longer documents would be skipped silently
    input_sentence_size=0,
    shuffle_input_sentence=False,
    num_threads=1,
    minloglevel=2,
)


def train_tokenizer(sentences: Iterable[str]) -> bytes:
    """Trains the tokenizer on `sentences` (whole documents); returns the serialized model."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **TRAINER_OPTIONS)
    return model.getvalue()


def load_sentencepiece(path: str = TOKENIZER_PATH) -> spm.SentencePieceProcessor:
    """The tokenizer as a plain SentencePieceProcessor (no TensorFlow involved)."""
    return spm.SentencePieceProcessor(model_file=path)


@functools.cache
def get_vocabulary(path: str = TOKENIZER_PATH) -> seqio.SentencePieceVocabulary:
    """The seqio vocabulary of the tokenizer at `path` (default: the committed one)."""
    return seqio.SentencePieceVocabulary(path)


_USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED


def build_chat_tokenizer(base_model: bytes) -> bytes:
    """The chat tokenizer from the serialized pretraining model: its pieces unchanged, then USER_MARKER and
    BOT_MARKER as USER_DEFINED pieces (score 0). Deterministic: the committed CHAT_TOKENIZER_PATH is
    `build_chat_tokenizer(<bytes of TOKENIZER_PATH>)` byte for byte (a test checks it)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(base_model)
    if len(proto.pieces) != VOCAB_SIZE or any(p.piece in CHAT_MARKERS for p in proto.pieces):
        raise ValueError(f"expected a {VOCAB_SIZE}-piece model without chat markers, got {len(proto.pieces)} pieces")
    for marker in CHAT_MARKERS:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = marker, 0.0, _USER_DEFINED
    return proto.SerializeToString()


def load_chat_sentencepiece(path: str = CHAT_TOKENIZER_PATH) -> spm.SentencePieceProcessor:
    """The chat tokenizer as a plain SentencePieceProcessor (no TensorFlow involved)."""
    return spm.SentencePieceProcessor(model_file=path)


def get_chat_vocabulary(path: str = CHAT_TOKENIZER_PATH) -> seqio.SentencePieceVocabulary:
    """The seqio vocabulary of the chat tokenizer (CHAT_VOCAB_SIZE ids)."""
    return get_vocabulary(path)
