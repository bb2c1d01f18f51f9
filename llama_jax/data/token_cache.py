"""Tokenize once: every local text file's documents as token ids (file_shards.py).

`llama-jax prepare-data` writes, for each input file of a text source, a folder of int32
token-id records under `data.cache_dir/tokens/<tokenizer>/` (the tokenizer's digest and
BOS/EOS flags), laid out as the file's text shards are, document for document in the same
order and splits. So re-running skips finished files, a changed file rebuilds only its own
folder, a changed tokenizer starts a new tree, and reading the ids gives the very batches
that tokenizing the text as it trains gives: a run may switch between the two on resume.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grain
import numpy as np

from llama_jax.config import DataConfig
from llama_jax.data import file_shards
from llama_jax.data.file_shards import SPLITS, FileShards
from llama_jax.data.text_shards import stored_documents, text_settings
from llama_jax.data.tokenizer import Tokenizer, load_tokenizer

BATCH_DOCUMENTS = 256  # documents per tokenizing task


def tokenizer_key(tokenizer: Tokenizer) -> str:
    return f"{tokenizer.digest()}-{int(tokenizer.add_bos)}{int(tokenizer.add_eos)}"


def cached_files(data: DataConfig, tokenizer: Tokenizer, files: list[Path]) -> list[FileShards]:
    root = Path(data.cache_dir) / "tokens" / tokenizer_key(tokenizer)
    return file_shards.shards_for(root, files, text_settings(data))


_worker_tokenizer: Tokenizer | None = None


def _start_worker(model: str, add_bos: bool, add_eos: bool) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(model, add_bos, add_eos)


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """A Ctrl-C reaches the terminal's whole process group. Processes started in this block
    inherit SIGINT ignored (an ignored signal stays ignored through exec, and Python then
    installs no KeyboardInterrupt handler), so the pool's workers never see one, rather than
    each printing a traceback of its start-up: their owner stops and ends them. A Ctrl-C
    within the block itself (the processes' creation, milliseconds) is not seen."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


Batch = tuple[list[str], list[str]]  # documents, and the split of each
Encoded = tuple[list[bytes], list[str], list[int]]  # token records, splits, UTF-8 bytes


def _encode(batch: Batch, tokenizer: Tokenizer | None = None) -> Encoded:
    tok = tokenizer or _worker_tokenizer
    assert tok is not None
    texts, splits = batch
    records = [np.asarray(ids, np.int32).tobytes() for ids in tok.encode_batch(texts)]
    return records, splits, [len(t.encode("utf-8")) for t in texts]


def _batches(stored: FileShards) -> Iterator[Batch]:
    """Up to BATCH_DOCUMENTS documents of a file's text shards at a time, with the split of
    each: the same documents in the same order as the text path reads."""
    texts: list[str] = []
    splits: list[str] = []
    for split, text in stored_documents(stored):
        texts.append(text)
        splits.append(split)
        if len(texts) == BATCH_DOCUMENTS:
            yield texts, splits
            texts, splits = [], []
    if texts:
        yield texts, splits


def build(data: DataConfig, tokenizer: Tokenizer, files: list[FileShards],
          texts: list[FileShards], progress: Callable[[int], None] | None = None
          ) -> dict[str, int]:
    """Tokenize (from `texts`, the files' text shards) the files whose folder is not
    finished, over `data.num_workers` processes (0: in this process); `progress(bytes)` hears
    of each batch's text bytes. Returns how many files were built, how many were already
    done, and the text bytes tokenized."""
    todo = [(f, t) for f, t in zip(files, texts, strict=True) if not f.done]
    text_bytes = 0
    pool = None

    def records(text: FileShards) -> Iterator[file_shards.Record]:
        nonlocal text_bytes
        batches = _batches(text)
        encoded = (pool.imap(_encode, batches) if pool is not None
                   else (_encode(b, tokenizer) for b in batches))
        for tokens, splits, sizes in encoded:
            for record, split, size in zip(tokens, splits, sizes, strict=True):
                yield split, record, len(record) // 4, size
            text_bytes += sum(sizes)
            if progress is not None:
                progress(sum(sizes))

    try:
        if data.num_workers > 0 and todo:
            context = multiprocessing.get_context("spawn")  # never fork a process running JAX
            with _workers_ignore_sigint():
                pool = context.Pool(data.num_workers, _start_worker,
                                    (str(tokenizer.path), tokenizer.add_bos, tokenizer.add_eos))
        for item, text in todo:
            file_shards.write(item, records(text))
    finally:
        if pool is not None:
            pool.terminate()
    return {"built": len(todo), "done_before": len(files) - len(todo), "bytes": text_bytes}


class DecodeTokens(grain.transforms.Map):
    def map(self, record: bytes) -> dict[str, np.ndarray]:
        return {"tokens": np.frombuffer(record, np.int32)}


def token_splits(files: list[FileShards]) -> dict[str, grain.MapDataset]:
    return {split: file_shards.read(files, split, DecodeTokens()) for split in SPLITS}


def token_stats(files: list[FileShards]) -> dict[str, dict[str, float]]:
    """Exact token counts per split, and bytes per predicted token (a document of n tokens
    predicts n - 1)."""
    stats = {}
    for split in SPLITS:
        parts = [f.index()[split] for f in files]
        tokens = sum(p["tokens"] for p in parts)
        targets = tokens - sum(p["documents"] for p in parts)
        stats[split] = {"tokens": float(tokens),
                        "bytes_per_token": sum(p["bytes"] for p in parts) / max(targets, 1)}
    return stats
