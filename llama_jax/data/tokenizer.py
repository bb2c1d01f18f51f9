"""Tokenizers in the two formats LLaMA-family weights ship with: sentencepiece models
(`tokenizer.model`: LLaMA 1/2, and the ones trained here on a dataset's train split) and HF
tokenizers' `tokenizer.json` (Llama 3, Pythia/GPT-NeoX, most HF folders). `load_tokenizer`
tells them apart by content; both frame a text as `data.add_bos`/`data.add_eos` say."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import sentencepiece as spm
from etils import epath

from llama_jax.errors import LlamaJaxError
from llama_jax.storage import PathLike, as_path, replace_bytes

MAX_TRAINING_DOCS = 50_000
# The files a run directory or an HF folder keeps its tokenizer in, in the order looked for:
# an HF LLaMA 2 folder holds both, and its sentencepiece model is the original.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
HF_TOKENIZER_CONFIG = "tokenizer_config.json"


def as_text(value: object) -> str:
    """TFDS text features decode to bytes without TensorFlow; accept str too."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return as_text(value.item())
    return str(value)


def load_tokenizer(path: PathLike, add_bos: bool = True, add_eos: bool = True) -> Tokenizer:
    """The tokenizer in `path` (a file or a folder holding one, local or on an object store),
    whichever its format: an HF `tokenizer.json` is a JSON object, a sentencepiece model a
    binary protocol buffer."""
    file = tokenizer_file(path)
    if file is None:
        raise LlamaJaxError(f"tokenizer {not_a_tokenizer(path)}")
    data = file.read_bytes()
    kind = HFTokenizer if data.lstrip()[:1] == b"{" else SentencePieceTokenizer
    return kind(file, data, add_bos, add_eos)


def tokenizer_file(path: PathLike) -> epath.Path | None:
    """What `data.tokenizer` names: a tokenizer file, or a folder holding one (an HF model's,
    a run's); None when it is neither."""
    path = as_path(path)
    if path.is_dir():
        return saved_tokenizer(path)
    return path if path.is_file() else None


def not_a_tokenizer(path: PathLike) -> str:
    """Why `tokenizer_file(path)` is None, for a one-line refusal."""
    if as_path(path).is_dir():
        return f"{path} is a folder without {' or '.join(TOKENIZER_FILES)}"
    return f"file not found: {path}"


def saved_tokenizer(folder: PathLike) -> epath.Path | None:
    """The tokenizer file a run directory or an HF folder holds, None when it has none."""
    for name in TOKENIZER_FILES:
        if (as_path(folder) / name).is_file():
            return as_path(folder) / name
    return None


class Tokenizer:
    """What the data pipeline, evaluation, sampling and lm-eval ask of a tokenizer. Texts
    are encoded without the format's own special tokens and framed here (BOS first, EOS last,
    as `data.add_bos`/`data.add_eos` say), so both formats pack documents alike."""

    file_name: ClassVar[str]  # what a run directory calls its copy

    def __init__(self, path: epath.Path, data: bytes, add_bos: bool, add_eos: bool):
        self.path, self._data = path, data
        self.add_bos, self.add_eos = add_bos, add_eos

    vocab_size: int
    bos_id: int  # -1: none
    eos_id: int

    def _ids(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens left out."""
        raise NotImplementedError

    def adds_bos(self) -> bool:
        """Whether the HF folder this came from begins each text with BOS."""
        raise NotImplementedError

    def hf_files(self) -> dict[str, bytes]:
        """What `convert orbax-to-hf` writes for transformers to tokenize as training did."""
        raise NotImplementedError

    def files(self) -> dict[str, bytes]:
        """What a run directory keeps of this tokenizer, by file name."""
        return {self.file_name: self._data}

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        return self._framed(self._ids([text])[0], bos, eos)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, through the library's batch call."""
        return [self._framed(ids) for ids in self._ids(texts)]

    def _framed(self, ids: list[int], bos: bool | None = None, eos: bool | None = None
                ) -> list[int]:
        if (self.add_bos if bos is None else bos) and self.bos_id >= 0:
            ids = [self.bos_id, *ids]
        if (self.add_eos if eos is None else eos) and self.eos_id >= 0:
            ids = [*ids, self.eos_id]
        return ids

    def digest(self) -> str:
        """Names the token cache's ids (and the split statistics) for this tokenizer."""
        return hashlib.sha1(self._data).hexdigest()[:12]


class SentencePieceTokenizer(Tokenizer):
    file_name = "tokenizer.model"

    def __init__(self, path: epath.Path, data: bytes, add_bos: bool, add_eos: bool):
        super().__init__(path, data, add_bos, add_eos)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (OSError, RuntimeError):
            raise LlamaJaxError(f"tokenizer {path} is not a sentencepiece model, nor an HF "
                                f"tokenizer.json") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.sp.EncodeAsIds(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def hf_config(self) -> dict[str, Any]:
        """The tokenizer_config.json that makes transformers tokenize as training did: the
        special pieces, and BOS before each text (without it, it adds none). No tokenizer
        class is named: transformers' generic sentencepiece conversion encodes exactly as
        sentencepiece does, while its `LlamaTokenizer` treats leading spaces differently."""
        sp = self.sp
        special = {name: sp.id_to_piece(i) for name, i in
                   (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                    ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())) if i >= 0}
        return {"add_bos_token": self.add_bos and sp.bos_id() >= 0, "add_eos_token": False,
                **special}

    def hf_files(self) -> dict[str, bytes]:
        return {**self.files(),
                HF_TOKENIZER_CONFIG: json.dumps(self.hf_config(), indent=2).encode()}

    def adds_bos(self) -> bool:
        """Whether the HF folder this came from frames texts with BOS (LLaMA's does unless
        its tokenizer_config.json says otherwise)."""
        config = _hf_config(self.path)
        return bool(config.get("add_bos_token", True)) and self.bos_id >= 0


class HFTokenizer(Tokenizer):
    """HF tokenizers' `tokenizer.json`. Its BOS and EOS are the `bos_token`/`eos_token` of the
    tokenizer_config.json beside it (as transformers reads them), else what its post-processor
    puts around a text; a run keeps both files."""

    file_name = "tokenizer.json"

    def __init__(self, path: epath.Path, data: bytes, add_bos: bool, add_eos: bool):
        from tokenizers import Tokenizer as Library

        super().__init__(path, data, add_bos, add_eos)
        try:
            self.hf = Library.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust parser raises a bare Exception; bytes not UTF-8
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LlamaJaxError(f"tokenizer {path} is not an HF tokenizer.json: "
                                f"{reason}") from None
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.config = _hf_config(path)
        before, after = self._post_processor_tokens()
        self.bos_id = self._special("bos_token", before[0] if len(before) == 1 else -1)
        self.eos_id = self._special("eos_token", after[-1] if len(after) == 1 else -1)
        self._adds_bos = bool(before)

    def _post_processor_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer's own post-processor puts before and after a text."""
        bare = self.hf.encode("a", add_special_tokens=False).ids
        framed = self.hf.encode("a", add_special_tokens=True).ids
        for start in range(len(framed) - len(bare) + 1):
            if framed[start:start + len(bare)] == bare:
                return framed[:start], framed[start + len(bare):]
        return [], []

    def _special(self, key: str, fallback: int) -> int:
        token = self.config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            found = self.hf.token_to_id(token)
            if found is None:
                raise LlamaJaxError(f"{self.path.parent / HF_TOKENIZER_CONFIG}: {key} "
                                    f"{token!r} is not in {self.path}")
            return found
        return fallback

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def files(self) -> dict[str, bytes]:
        """tokenizer.json, and a tokenizer_config.json naming the BOS and EOS chosen (the
        folder's own, with them filled in where it had none)."""
        config = dict(self.config)
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if i >= 0 and not config.get(key):
                config[key] = self.hf.id_to_token(i)
        return {**super().files(), HF_TOKENIZER_CONFIG: json.dumps(config, indent=2).encode()}

    hf_files = files

    def digest(self) -> str:
        """The files' bytes: the BOS and EOS chosen are part of the ids."""
        h = hashlib.sha1()
        for name, data in sorted(self.files().items()):
            h.update(name.encode() + b"\0" + data)
        return h.hexdigest()[:12]

    def adds_bos(self) -> bool:
        """Whether the tokenizer's post-processor puts BOS before a text (Llama 3's does,
        GPT-NeoX's does not)."""
        return self._adds_bos


def _hf_config(tokenizer_path: epath.Path) -> dict[str, Any]:
    """The tokenizer_config.json beside a tokenizer file ({} when there is none)."""
    path = tokenizer_path.parent / HF_TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamaJaxError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise LlamaJaxError(f"{path}: expected a JSON object")
    return config


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
