"""sentencepiece tokenizers: train one on a dataset's train split, or load any `.model`."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from llama_jax.errors import LlamaJaxError
from llama_jax.storage import as_path, replace_bytes

MAX_TRAINING_DOCS = 50_000


def as_text(value: object) -> str:
    """TFDS text features decode to bytes without TensorFlow; accept str too."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return as_text(value.item())
    return str(value)


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike, add_bos: bool = True,
                 add_eos: bool = True):
        path = as_path(model_path)  # a run's copy may live on an object store
        if not path.is_file():
            raise LlamaJaxError(f"tokenizer not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(path.read_bytes())
        except (OSError, RuntimeError):
            raise LlamaJaxError(f"tokenizer {path} is not a sentencepiece model") from None
        self.add_bos, self.add_eos = add_bos, add_eos

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        return self._framed(self.sp.EncodeAsIds(text), bos, eos)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, through sentencepiece's batch call."""
        return [self._framed(ids) for ids in self.sp.EncodeAsIds(texts)]

    def _framed(self, ids: list[int], bos: bool | None = None, eos: bool | None = None
                ) -> list[int]:
        if (self.add_bos if bos is None else bos) and self.bos_id >= 0:
            ids = [self.bos_id, *ids]
        if (self.add_eos if eos is None else eos) and self.eos_id >= 0:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def digest(self) -> str:
        return hashlib.sha1(self.path.read_bytes()).hexdigest()[:12]


def _training_lines(parts: list[tuple[Any, str]]) -> Iterator[str]:
    """The lines of up to MAX_TRAINING_DOCS documents, shared evenly by the sources."""
    per_source = MAX_TRAINING_DOCS // max(len(parts), 1)
    for source, text_key in parts:
        for i in range(min(len(source), per_source)):
            for line in as_text(source[i][text_key]).splitlines():
                if line.strip():
                    yield line


def train_tokenizer(parts: list[tuple[Any, str]], vocab_size: int, out_path: Path) -> Path:
    """BPE with byte fallback (LLaMA's recipe): unk=0, bos=1, eos=2, no pad piece, trained
    on the documents of `parts`, (random-access documents, their text field) pairs."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_training_lines(parts), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
            character_coverage=0.9995, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=16384,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        # sentencepiece's reason follows its check's source location: "INTERNAL: x.cc(744)
        # [(a) == (b)] Vocabulary size too high (512). Please set it to a value <= 324."
        reason = str(e).strip().splitlines()[-1].rpartition("] ")[2]
        raise LlamaJaxError(
            f"sentencepiece could not train a {vocab_size}-piece tokenizer (the size is "
            f"data.tokenizer_vocab_size, or model.vocab_size where that is 0): "
            f"{reason}"
        ) from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    replace_bytes(out_path, model.getvalue())
    return out_path
