"""Megatron / GPT-NeoX tokenized data: `.bin` + `.idx` pairs in the MMIDIDX format, as NeoX's
`tools/datasets/preprocess_data.py` writes them.

`.idx`: the magic `MMIDIDX\\x00\\x00`, a uint64 version (1), a uint8 dtype code, a uint64
count of sequences, a uint64 count of document-index entries, then int32 sizes (tokens per
sequence), int64 pointers (byte offsets into `.bin`) and the int64 document index.
`.bin`: the tokens of every sequence, back to back, in that dtype. Both are read by memory
map, so a corpus of any size costs no RAM and any document is one slice away (Grain's random
access). Every inconsistency is refused in one line naming the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from llama_jax.errors import LlamaJaxError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# NeoX's dtype codes (Megatron's differ only at 6: float64 there, float32 here; neither is
# a token type).
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32,
    7: np.float64, 8: np.uint16,
}
TOKEN_CODES = (1, 3, 4, 5, 8)  # integer types that can hold token ids
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8


class MegatronDataError(LlamaJaxError):
    """A `.bin`/`.idx` pair that cannot be read as tokens."""


def code_of(dtype: np.dtype | type) -> int:
    wanted = np.dtype(dtype)
    for code, kind in DTYPE_CODES.items():
        if np.dtype(kind) == wanted:
            return code
    raise ValueError(f"no MMIDIDX code for {wanted}")


class IndexedTokens:
    """The sequences of one prefix, by index: `tokens[i]` is sequence i as int32."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise MegatronDataError(f"{path}: no such file (data.paths names prefixes of "
                                        f".bin/.idx pairs)")
        raw = np.memmap(idx_path, np.uint8, mode="r")
        if raw.size < HEADER_BYTES or bytes(raw[:len(MAGIC)]) != MAGIC:
            raise MegatronDataError(f"{idx_path}: not an MMIDIDX index (wrong magic)")
        offset = len(MAGIC)
        version = int(raw[offset:offset + 8].view(np.uint64)[0])
        if version != VERSION:
            raise MegatronDataError(f"{idx_path}: MMIDIDX version {version}, only {VERSION} "
                                    f"is known")
        code = int(raw[offset + 8])
        if code not in TOKEN_CODES:
            known = ", ".join(f"{c} ({np.dtype(DTYPE_CODES[c]).name})" for c in TOKEN_CODES)
            raise MegatronDataError(f"{idx_path}: dtype code {code} is not a token type "
                                    f"({known})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        count, doc_count = raw[offset + 9:offset + 25].view(np.uint64).astype(np.int64)
        expected = HEADER_BYTES + count * 4 + count * 8 + doc_count * 8
        if raw.size != expected:
            raise MegatronDataError(f"{idx_path}: {raw.size} bytes, but its header "
                                    f"({count} sequences, {doc_count} document entries) "
                                    f"needs {expected}")
        start = HEADER_BYTES
        self.sizes = raw[start:start + count * 4].view(np.int32)
        start += count * 4
        self.pointers = raw[start:start + count * 8].view(np.int64)
        start += count * 8
        self.doc_idx = raw[start:start + doc_count * 8].view(np.int64)
        self.tokens = np.memmap(bin_path, self.dtype, mode="r") if bin_path.stat().st_size \
            else np.zeros(0, self.dtype)
        self._check_against_bin(bin_path)

    def _check_against_bin(self, bin_path: Path) -> None:
        item = self.dtype.itemsize
        bin_bytes = bin_path.stat().st_size
        if len(self.sizes) == 0:
            if bin_bytes:
                raise MegatronDataError(f"{self.prefix}.idx lists no sequences but "
                                        f"{bin_path} holds {bin_bytes} bytes")
            return
        ends = self.pointers + self.sizes.astype(np.int64) * item
        contiguous = np.array_equal(self.pointers[1:], ends[:-1]) and self.pointers[0] == 0
        if (self.sizes < 0).any() or not contiguous or int(ends[-1]) != bin_bytes:
            raise MegatronDataError(
                f"{self.prefix}.idx does not match {bin_path}: its {len(self.sizes)} sequences "
                f"cover {int(ends[-1])} bytes of {self.dtype.name}, the file has {bin_bytes}")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return {"tokens": np.asarray(self.tokens[start:start + int(self.sizes[i])], np.int32)}

    @property
    def total_tokens(self) -> int:
        return int(self.sizes.astype(np.int64).sum())


def write_indexed(prefix: str | Path, documents: Iterable[Iterable[int]],
                  dtype: np.dtype | type = np.uint16) -> None:
    """Write `prefix.bin` and `prefix.idx` as NeoX's MMapIndexedDatasetBuilder does (one
    sequence per document, the document index 0..n): for tests and small tools."""
    dtype = np.dtype(dtype)
    arrays = [np.asarray(list(doc), dtype) for doc in documents]
    sizes = np.asarray([a.size for a in arrays], np.int32)
    pointers = (np.cumsum(sizes, dtype=np.int64) - sizes) * dtype.itemsize
    with open(f"{prefix}.bin", "wb") as f:
        for a in arrays:
            f.write(a.tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(MAGIC)
        f.write(np.uint64(VERSION).tobytes())
        f.write(np.uint8(code_of(dtype)).tobytes())
        f.write(np.uint64(len(arrays)).tobytes())
        f.write(np.uint64(len(arrays) + 1).tobytes())
        f.write(sizes.tobytes())
        f.write(pointers.astype(np.int64).tobytes())
        f.write(np.arange(len(arrays) + 1, dtype=np.int64).tobytes())


# ---------------------------------------------------------------------------------------------
# As a run's data source: `data.dataset=megatron`, `data.paths`, `data.weights`


class DocumentRange:
    """Documents [start, stop) of one prefix: a split, as a Grain random-access source."""

    def __init__(self, tokens: IndexedTokens, start: int, stop: int):
        self.data, self.start, self.stop = tokens, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.data[self.start + int(i)]

    @property
    def tokens(self) -> int:
        return int(self.data.sizes[self.start:self.stop].astype(np.int64).sum())


def prefix_splits(prefix: str, validation_fraction: float) -> dict[str, DocumentRange]:
    """A prefix's last `validation_fraction` of documents (at least one) is its validation
    split, the rest its train split: contiguous, as NeoX's `split` cuts."""
    data = IndexedTokens(prefix)
    if len(data) < 2:
        raise MegatronDataError(f"{prefix}.idx: {len(data)} documents; a train and a "
                                f"validation split need at least 2")
    held = min(max(1, round(len(data) * validation_fraction)), len(data) - 1)
    return {"train": DocumentRange(data, 0, len(data) - held),
            "validation": DocumentRange(data, len(data) - held, len(data))}
