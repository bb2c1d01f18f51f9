"""The data pipeline's figures (#19): tokenizing speed against sentencepiece's own, rows per
second from the token cache and from text, and resident memory while a corpus larger than
memory budgets is prepared and trained on.

    python scripts/bench_data.py --gb 4 --out /tmp/bench_data    # the figures in
                                                                  # docs/performance.md

It writes a parquet corpus of about `--gb` GB (documents cut from the python_docs text, so
the words are real), then runs, each as its own process whose peak resident memory is
sampled: `llama-jax prepare-data` (TFDS build, tokenizer, token cache over `--workers`
processes) and `llama-jax train` on the cache (`--steps` steps of the tiny model, rows of
`--seq-len` tokens, 2048 by default). In this process it measures sentencepiece's
single-core encode speed on a sample, and `bench --pipeline`'s tokens per second from the
cache and from text. One JSON line at the end holds every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from llama_jax.errors import script_main

ROOT = Path(__file__).resolve().parent.parent
FILE_BYTES = 256 << 20  # one parquet file per 256 MB of text


def write_corpus(out: Path, gb: float, seed: int = 0) -> tuple[list[Path], int]:
    """Parquet files of documents (300 to 30,000 characters) cut at random from the
    python_docs text; returns the files and the text bytes written."""
    from llama_jax.data.corpus import python_docs_documents

    base = "\n\n".join(text for _, text in python_docs_documents())
    rng = np.random.default_rng(seed)
    target, written, files = int(gb * 1e9), 0, []
    out.mkdir(parents=True, exist_ok=True)
    while written < target:
        docs, size = [], 0
        while size < min(FILE_BYTES, target - written):
            n = int(rng.integers(300, 30_000))
            start = int(rng.integers(0, len(base) - n))
            docs.append(base[start:start + n])
            size += n
        path = out / f"part-{len(files):05d}.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=2048)
        files.append(path)
        written += size
    return files, written


def peak_rss(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(peak resident GiB of the process and its children, seconds, stderr's tail), from
    sampling every 0.2 s."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    done.set()
    watcher.join()
    if proc.returncode:
        sys.exit(f"{' '.join(command[:4])} ... failed ({proc.returncode}): {err[-2000:]}")
    return peak / 2**30, time.perf_counter() - start, out + err


def sentencepiece_speed(model: str, files: list[Path], sample_bytes: int) -> float:
    """Bytes per second of sentencepiece's own batch encode, on one core."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    texts, size = [], 0
    for batch in pq.ParquetFile(files[0]).iter_batches(batch_size=256, columns=["text"]):
        for t in batch.column("text").to_pylist():
            texts.append(t)
            size += len(t.encode())
        if size >= sample_bytes:
            break
    start = time.perf_counter()
    sp.EncodeAsIds(texts, num_threads=1)
    return size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=4.0, help="corpus size in GB of text")
    parser.add_argument("--out", type=Path, required=True, help="a folder for corpus and cache")
    parser.add_argument("--workers", type=int, default=2, help="prepare-data processes")
    parser.add_argument("--steps", type=int, default=20, help="train steps on the cache")
    parser.add_argument("--batches", type=int, default=200, help="pipeline batches timed")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row")
    args = parser.parse_args()

    corpus = args.out / "corpus"
    files = sorted(corpus.glob("*.parquet"))
    if not files:
        t = time.perf_counter()
        files, written = write_corpus(corpus, args.gb)
        print(f"corpus: {written / 1e9:.2f} GB of text in {len(files)} parquet files "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    documents = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    cli = [sys.executable, "-m", "llama_jax.cli"]
    data = ["configs/tiny.yaml", "data.dataset=text_files", f"data.files={corpus}",
            f"data.cache_dir={args.out / 'cache'}", f"data.seq_len={args.seq_len}",
            f"model.max_position_embeddings={args.seq_len}", f"data.num_workers={args.workers}"]
    one_device = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    prep_gib, prep_s, prep_log = peak_rss([*cli, "prepare-data", *data], one_device)
    model = next(line.split()[1].rstrip(":") for line in prep_log.splitlines()
                 if line.startswith("tokenizer "))

    from llama_jax.bench import bench_pipeline
    from llama_jax.config import load_config
    from llama_jax.data.feed import prepare

    cfg = load_config(data[0], [*data[1:], f"run_dir={args.out / 'run'}"])
    prepared = prepare(cfg)
    text = sum(s.stats[split]["tokens"] * s.stats[split]["bytes_per_token"]
               for s in prepared.sources for split in ("train", "validation"))
    pipeline = bench_pipeline(cfg, batches=args.batches)
    reference = sentencepiece_speed(model, files, 20 << 20)
    tokenize_s = _tokenize_seconds(prep_log)
    per_worker = text / tokenize_s / max(args.workers, 1) if tokenize_s else None
    train_gib, train_s, _ = peak_rss(
        [*cli, "train", *data, f"run_dir={args.out / 'run'}", f"train.steps={args.steps}",
         "checkpoint.every=0", "train.eval_batches=1", "train.global_batch_size=2"],
        one_device)  # two rows a step: the model's own buffers (host memory on CPU) stay small
    figures = {
        "corpus_gb": round(text / 1e9, 3), "documents": documents, "files": len(files),
        "prepare_s": round(prep_s, 1), "prepare_peak_rss_gib": round(prep_gib, 2),
        "tokenize_s": tokenize_s, "tokenize_mb_per_s_per_worker":
            per_worker and round(per_worker / 1e6, 2),
        "sentencepiece_mb_per_s_one_core": round(reference / 1e6, 2),
        "tokenize_slowdown": per_worker and round(reference / per_worker, 2),
        "cache_tokens_per_sec": round(pipeline["pipeline_cache_tokens_per_sec"] or 0),
        "text_tokens_per_sec": round(pipeline["pipeline_text_tokens_per_sec"]),
        "train_s": round(train_s, 1), "train_peak_rss_gib": round(train_gib, 2),
    }
    for key, value in figures.items():
        print(f"{key:34s} {value}", file=sys.stderr)
    print(json.dumps(figures))


def _tokenize_seconds(log: str) -> float | None:
    """prepare-data's own figure for the token-cache phase: "tokenized ... in S s ..."."""
    for line in log.splitlines():
        if line.startswith("tokenized "):
            return float(line.split(" in ")[1].split(" s")[0])
    return None


if __name__ == "__main__":
    script_main("bench_data", main)
