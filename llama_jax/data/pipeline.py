"""The Grain input pipeline, and `prepare_data`, which builds what it needs once.

Per process: each source's global shuffle by index (reshuffled every epoch) -> this process's
share of it (`[process_index::process_count]`) -> tokenize -> the sources mixed by token share
(mixture.py) -> concatenate documents and split into rows of
`seq_len + 1` tokens (long documents continue in the next row) -> model rows -> batch ->
background prefetch. Every step is a Grain dataset, so the iterator's state can be saved and
restored exactly. Evaluation packs the whole stream on every process instead (each keeps its
rows of each global batch), and `eval` reads a whole split once (`whole_split`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from etils import epath

from llama_jax.config import Config
from llama_jax.data.batch import model_row
from llama_jax.data.cache_lock import building
from llama_jax.data.mixture import (
    SPLITS,
    Source,
    SourceTally,
    TagSource,
    epochs,
    load_source,
    mixed_documents,
    source_settings,
)
from llama_jax.data.tokenizer import (
    Tokenizer,
    as_text,
    load_tokenizer,
    not_a_tokenizer,
    tokenizer_file,
    train_tokenizer,
)
from llama_jax.errors import LlamaJaxError
from llama_jax.storage import as_path

STATS_DOCS = 2000


class Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer_path: str, add_bos: bool, add_eos: bool, text_key: str):
        self.args = (tokenizer_path, add_bos, add_eos)
        self.text_key = text_key
        self._tok: Tokenizer | None = None

    def map(self, element: Any) -> dict[str, np.ndarray]:
        if self._tok is None:  # built lazily: workers and pickling carry only the path
            self._tok = load_tokenizer(*self.args)
        return {"tokens": np.asarray(self._tok.encode(as_text(element[self.text_key])), np.int32)}


def _rows(batch: dict[str, np.ndarray], start: int, count: int) -> dict[str, np.ndarray]:
    return {key: value[start:start + count] for key, value in batch.items()}


def _tokenize(cfg: Config, data: PreparedData, text_key: str) -> Tokenize:
    return Tokenize(str(data.tokenizer.path), cfg.data.add_bos, cfg.data.add_eos, text_key)


def _packed(cfg: Config, documents: grain.MapDataset, rows: int, drop_remainder: bool
            ) -> grain.IterDataset:
    """Documents concatenated and split into rows of seq_len + 1 tokens (a long document
    continues in the next row), as model rows, in batches of `rows`."""
    length = cfg.data.seq_len + 1
    # Grain's default (16 threads, 500 documents ahead) spends more time polling its
    # buffer than reading: a small pool keeps up with packing and costs far less.
    threads = cfg.data.read_threads
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=16 * threads)
    it = grain.experimental.ConcatThenSplitIterDataset(
        documents.to_iter_dataset(read), length_struct={"tokens": length, "source": length})
    return it.map(model_row).batch(rows, drop_remainder=drop_remainder)


def whole_split(cfg: Config, data: PreparedData, split: str, rows: int
                ) -> Iterator[dict[str, np.ndarray]]:
    """Every document of `split` once, in order, source after source, as this process's rows
    of global batches of `rows` that every process packs alike. Each source's last batch is
    filled out with empty rows (no target in them counts), so every batch has one shape.
    What `eval` scores for a whole split: no document twice, none left out (the repeating
    stream of `TextPipeline` wrapped around to the split's first documents to fill its
    last batch: with a split of 1.1 batches, nearly half of what it scored, twice)."""
    per_process = rows // jax.process_count()
    start = jax.process_index() * per_process
    for index, src in enumerate(data.sources):
        documents = src.splits[split]
        if src.text_key is not None:
            documents = documents.map(_tokenize(cfg, data, src.text_key))
        packed = _packed(cfg, documents.map(TagSource(index)), rows, drop_remainder=False)
        if cfg.data.prefetch:  # the next batches made while the device scores this one
            packed = grain.experimental.ThreadPrefetchIterDataset(
                packed, prefetch_buffer_size=cfg.data.prefetch)
        for batch in packed:
            short = rows - batch["inputs"].shape[0]
            if short:
                batch = {key: np.concatenate([value, np.zeros((short, *value.shape[1:]),
                                                              value.dtype)])
                         for key, value in batch.items()}
            yield _rows(batch, start, per_process)


class TextPipeline:
    """This process's batches of one split: an iterator with Grain's get_state/set_state,
    which also tallies the tokens of each source it has handed out.

    Batches keep their `source` array (each input's source index) only with `keep_source`
    (evaluation by source); training batches drop it after the tally.
    """

    def __init__(self, cfg: Config, data: PreparedData, split: str, rows_per_process: int,
                 seed: int, shuffle: bool = True, process_index: int | None = None,
                 process_count: int | None = None, keep_source: bool = False,
                 shared: bool = False):
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        # `shared` (evaluation): every process packs the whole stream into global batches
        # and keeps its own rows of each, so the rows scored are the same whatever the
        # number of processes (packing each process's share of the documents apart gives
        # other rows: another loss, over another count of tokens). Training reads shares.
        rows, share = (rows_per_process * pc, (0, 1)) if shared else (rows_per_process, (pi, pc))
        ds = mixed_documents(data.sources, split, seed, shuffle, *share,
                             functools.partial(_tokenize, cfg, data))
        it = _packed(cfg, ds, rows, drop_remainder=True)
        if rows != rows_per_process:
            it = it.map(functools.partial(_rows, start=pi * rows_per_process,
                                          count=rows_per_process))
        if cfg.data.prefetch:
            it = grain.experimental.ThreadPrefetchIterDataset(
                it, prefetch_buffer_size=cfg.data.prefetch
            )
        self._iter = iter(it)
        self.corpus = corpus_fingerprint(data.sources)
        self.keep_source = keep_source
        self.sources = data.sources
        self.tally = SourceTally(data.names)
        self._epochs_begun = dict.fromkeys(data.names, 0)

    def __iter__(self) -> TextPipeline:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        self.tally.add(batch)
        if not self.keep_source:
            batch = {k: v for k, v in batch.items() if k != "source"}
        return batch

    def close(self) -> None:
        """Stop the prefetch thread now rather than at interpreter exit."""
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()

    def report(self) -> dict[str, Any]:
        """A metrics row's data fields: the run's tokens per source, and how many passes over
        each source's train split they amount to (a note when a source begins another)."""
        tokens = self.tally.total()
        passes = dict(epochs(tokens, self.sources))
        for name, done in passes.items():
            if int(done) > self._epochs_begun[name]:
                self._epochs_begun[name] = int(done)
                if jax.process_index() == 0 and len(self.sources) > 1:
                    print(f"note: data source {name} began pass {int(done) + 1} over its "
                          f"train split", file=sys.stderr)
        row = {"tokens_by_source": tokens,
               "epochs_by_source": {name: round(p, 4) for name, p in passes.items()}}
        if any(src.skipped_records for src in self.sources):
            row["skipped_records"] = {src.name: src.skipped_records for src in self.sources}
        return row

    def get_state(self) -> dict[str, Any]:
        """The iterator's position and the run's tokens per source (collectives on multi-host
        runs, like every checkpoint save). Text and its token cache give the same documents
        in the same order, so a run may resume reading either.

        A checkpoint's data state is written by process 0 alone, and each process's position
        is its own (its documents, so its packing, differ): on multi-host runs every
        process's position is gathered into `iterators`, and each takes back its own."""
        mine = self._iter.get_state()
        state = {"iterator": mine, "tokens_by_source": self.tally.total(),
                 "corpus": self.corpus}
        if jax.process_count() > 1:
            state["iterators"] = _gathered(mine)
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if "iterator" not in state:  # saved before the tally existed: Grain's state alone
            state = {"iterator": state}
        each = state.get("iterators") or []
        written_by = len(each) or 1
        mine = each[jax.process_index()] if each and written_by == jax.process_count() else \
            state["iterator"]
        self._iter.set_state(_tuples_restored(mine))
        if written_by != jax.process_count() and jax.process_index() == 0:
            # Each process reads every process_count-th document and packs its own rows,
            # so no position of the new processes continues the old order; process 0's is
            # the nearest (documents of this pass may be read twice or not at all).
            print(f"warning: the data position was saved by {written_by} process(es) and "
                  f"this run has {jax.process_count()}; each process goes on from process "
                  f"0's saved position in its new share of the documents, so this pass may "
                  f"repeat or skip documents that an uninterrupted run would not",
                  file=sys.stderr)
        changed = [name for name, digest in state.get("corpus", {}).items()
                   if self.corpus.get(name, digest) != digest]
        if changed and jax.process_index() == 0:
            print(f"warning: data source {', '.join(changed)} changed since this checkpoint "
                  f"was written (its files or documents differ); the run goes on from its "
                  f"saved position in the new documents, so it no longer reads what an "
                  f"uninterrupted run would", file=sys.stderr)
        saved = state.get("tokens_by_source", {})
        self.tally.restore(saved)
        self._epochs_begun = {name: int(p) for name, p in epochs(saved, self.sources)}


def corpus_fingerprint(sources: list[Source]) -> dict[str, str]:
    """Per source, a digest of what it reads: its local files' names and sizes and its
    documents per split. Saved with the data position, so a resume can say when the data
    changed under the run (a file appended to, a TFDS version rebuilt); cheap, and blind to
    an edit that keeps every size."""
    out = {}
    for src in sources:
        h = hashlib.sha1()
        for f in sorted(src.files):
            h.update(f"{f.name}:{_size(f)}|".encode())
        for split in sorted(src.splits):
            h.update(f"{split}:{len(src.splits[split])}|".encode())
        out[src.name] = h.hexdigest()[:16]
    return out


def _size(path: Any) -> int:
    try:
        return int(path.stat().st_size)
    except Exception:  # noqa: BLE001 - gone, or a store without sizes: the same every time
        return -1


def _gathered(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in process order (a collective)."""
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.int64(raw.size))))
    padded = np.zeros(longest, np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row).rstrip(b"\0")) for row in rows]


def _tuples_restored(state: Any) -> Any:
    """Grain's packing state holds (start, stop) tuples and compares them with a (-1, -1)
    sentinel; a checkpoint stores the state as JSON, which makes them lists, and a list never
    equals the sentinel (the restored iterator would skip a document). Make them tuples."""
    if not isinstance(state, dict):
        return state
    return {key: ({k: tuple(v) for k, v in value.items()} if key == "remainder_slices"
                  else _tuples_restored(value)) for key, value in state.items()}


@dataclass
class PreparedData:
    sources: list[Source]
    tokenizer: Tokenizer | None  # None: every source is token ids already (megatron)
    stats: dict[str, dict[str, float | None]]  # split -> bytes_per_token, tokens (estimated)

    @property
    def bytes_per_token(self) -> dict[str, float | None]:
        return {split: s["bytes_per_token"] for split, s in self.stats.items()}

    @property
    def names(self) -> list[str]:
        return [src.name for src in self.sources]


def _resolve_tokenizer(cfg: Config, sources: list[Source]) -> os.PathLike:
    """`data.tokenizer`, else one trained on the text sources' train splits (cached beside a
    lone source's dataset, or under `data.cache_dir` for a mixture)."""
    if cfg.data.tokenizer:
        path = tokenizer_file(cfg.data.tokenizer)
        if path is None:
            raise LlamaJaxError(f"data.tokenizer: {not_a_tokenizer(cfg.data.tokenizer)}")
        return path
    vocab = cfg.data.tokenizer_vocab_size or cfg.model.vocab_size
    text = [src for src in sources if src.text_key is not None]
    if len(text) == 1:
        path = text[0].cache_dir / f"tokenizer-bpe{vocab}.model"
    else:
        ids = hashlib.sha1("|".join(src.cache_dir.name for src in text).encode()).hexdigest()
        path = as_path(cfg.data.cache_dir) / f"tokenizer-mix{ids[:12]}-bpe{vocab}.model"
    if not path.is_file():
        names = ", ".join(src.name for src in text)
        print(f"training a {vocab}-piece sentencepiece tokenizer on {names} ...",
              file=sys.stderr)
        train_tokenizer([(src.splits["train"], src.text_key) for src in text], vocab, path)
    return path


def _text_stats(src: Source, tokenizer: Tokenizer) -> dict[str, dict[str, float]]:
    """UTF-8 bytes per predicted token of each split, and its size in tokens (measured on up to
    STATS_DOCS documents, scaled to the split).

    A document of n tokens (BOS/EOS included) gives n - 1 targets; evaluation turns nats per
    token into bits per byte with this ratio.
    """
    flags = f"{int(tokenizer.add_bos)}{int(tokenizer.add_eos)}"
    path = src.cache_dir / f"stats2-{tokenizer.digest()}-{flags}.json"
    if path.is_file():
        return json.loads(path.read_text())
    stats = {}
    for split, docs in src.splits.items():
        n_bytes = n_tokens = 0
        counted = min(len(docs), STATS_DOCS)
        for i in range(counted):
            text = as_text(docs[i][src.text_key])
            n_bytes += len(text.encode("utf-8"))
            n_tokens += max(len(tokenizer.encode(text)) - 1, 0)
        stats[split] = {"bytes_per_token": n_bytes / max(n_tokens, 1),
                        "tokens": n_tokens * len(docs) / max(counted, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats))
    return stats


def _mixture_stats(sources: list[Source]) -> dict[str, dict[str, float | None]]:
    """A split's size is its sources' sizes summed; its bytes per token the token-share
    weighted mean (bytes = sum over sources of share x tokens x bytes per token), known only
    when every source is text."""
    stats = {}
    for split in SPLITS:
        bpt = [src.stats[split]["bytes_per_token"] for src in sources]
        stats[split] = {
            "tokens": float(sum(src.stats[split]["tokens"] for src in sources)),
            "bytes_per_token": None if None in bpt else
            sum(src.weight * b for src, b in zip(sources, bpt, strict=True)),
        }
    return stats


def prepare_data(cfg: Config) -> PreparedData:
    """Build (once, cached) every source and the tokenizer, and check the tokenizer fits."""
    if jax.process_index() == 0:
        data = _prepare(cfg)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llama_jax.prepare_data")
    if jax.process_index() != 0:
        data = _prepare(cfg)
    return data


def _prepare(cfg: Config) -> PreparedData:
    with building(Path(cfg.data.cache_dir)):
        return _prepare_locked(cfg)


def _prepare_locked(cfg: Config) -> PreparedData:
    sources = [load_source(*named) for named in source_settings(cfg.data)]
    tokenizer = None
    if any(src.text_key is not None for src in sources):
        tokenizer = load_tokenizer(_resolve_tokenizer(cfg, sources), cfg.data.add_bos,
                                   cfg.data.add_eos)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise LlamaJaxError(
                f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but "
                f"model.vocab_size={cfg.model.vocab_size}"
            )
        _note_missing_specials(tokenizer)
    for src in sources:
        if src.text_key is None:
            _check_token_ids(src, cfg.model.vocab_size)
        else:
            src.stats = _text_stats(src, tokenizer)
            if cfg.data.token_cache:
                _read_token_cache(src, tokenizer)
            if jax.process_index() == 0 and src.files:
                print(f"data source {src.name}: " + (
                    "reading token ids (tokenized once by prepare-data)" if src.reads == "tokens"
                    else "tokenizing text as it trains (`llama-jax prepare-data` tokenizes "
                         "once)"), file=sys.stderr)
    return PreparedData(sources, tokenizer, _mixture_stats(sources))


def _note_missing_specials(tokenizer: Tokenizer) -> None:
    """A tokenizer.json alone may name no BOS or EOS: documents are then framed without them,
    and a model that never saw an EOS never stops sampling. Said, not refused."""
    missing = [name for name, wanted, i in (("BOS", tokenizer.add_bos, tokenizer.bos_id),
                                            ("EOS", tokenizer.add_eos, tokenizer.eos_id))
               if wanted and i < 0]
    if missing and jax.process_index() == 0:
        print(f"note: tokenizer {tokenizer.path} has no {' or '.join(missing)} token, so "
              f"documents are framed without it (a tokenizer_config.json beside a "
              f"tokenizer.json names them: bos_token, eos_token)", file=sys.stderr)


def _read_token_cache(src: Source, tokenizer: Tokenizer) -> None:
    """Read the source's token ids when `prepare-data` has written them for all its files."""
    from llama_jax.data import token_cache

    if not src.files:
        return
    cached = token_cache.cached_files(src.settings, tokenizer, src.files)
    if all(f.done for f in cached):
        # The statistics stay the text's estimates: the mixing rates come from them, and the
        # same rates in both ways keep the batches the same.
        src.splits, src.text_key, src.reads = token_cache.token_splits(cached), None, "tokens"


def tokenize_once(cfg: Config, data: PreparedData) -> list[tuple[str, dict[str, int]]]:
    """`prepare-data`: write the token ids of every text source's files (the files already
    done are skipped), with a progress bar of text MB/s and time left. Returns, per source,
    how many files were built and how many were done before."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from llama_jax.data import token_cache
    from llama_jax.data.text_shards import text_files

    todo = [(src, token_cache.cached_files(src.settings, data.tokenizer, src.files))
            for src in data.sources if src.files]
    done = []
    with building(Path(cfg.data.cache_dir)), \
            Progress(TextColumn("[bold]tokenizing {task.fields[name]}"), BarColumn(),
                     DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                     transient=not sys.stderr.isatty()) as bar:
        for src, cached in todo:
            text_bytes = sum(src.stats[s]["tokens"] * src.stats[s]["bytes_per_token"]
                             for s in SPLITS)  # an estimate: the size of the text, not files
            task = bar.add_task("", total=text_bytes, name=src.name)
            counts = token_cache.build(src.settings, data.tokenizer, cached,
                                       text_files(src.settings, src.files),
                                       lambda n, t=task: bar.advance(t, n))
            bar.update(task, completed=text_bytes)
            done.append((src.name, counts))
    return done


def _check_token_ids(src: Source, vocab_size: int) -> None:
    """Token ids must fit the model: checked on a sample of documents (reading every token of
    a large corpus would take minutes)."""
    docs = src.splits["train"]
    sample = [docs[i]["tokens"] for i in range(min(len(docs), STATS_DOCS))]
    largest = max((int(t.max()) for t in sample if t.size), default=0)
    if largest >= vocab_size:
        raise LlamaJaxError(f"data source {src.name}: token id {largest} does not fit "
                            f"model.vocab_size={vocab_size}")


def copy_tokenizer(data: PreparedData, run_dir: epath.Path) -> None:
    """Runs carry their tokenizer, so evaluation and sampling need nothing else."""
    if jax.process_index() == 0 and data.tokenizer is not None:
        for name, content in data.tokenizer.files().items():
            (run_dir / name).write_bytes(content)
