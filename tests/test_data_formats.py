"""`data.files` formats: every one reads to the same documents as the same text stored as
`.txt` files, and each kind of bad data is refused in one line naming the file (or, with
`data.skip_bad_records=true`, skipped and counted)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from helpers import run_cli

from llama_jax.config import load_config
from llama_jax.data.corpus import BadRecords, expand_files, read_documents
from llama_jax.errors import LlamaJaxError


def texts(count: int = 40) -> list[str]:
    """Documents with non-ASCII text, inner newlines and varied lengths."""
    rng = np.random.default_rng(3)
    words = ["naïve", "façade", "日本語", "data", "mixture", "token", "Ünïcode", "λ", "shard"]
    return [" ".join(rng.choice(words, rng.integers(3, 60))) + f"\nline two of {i}."
            for i in range(count)]


def write_formats(root: Path, docs: list[str]) -> dict[str, Path]:
    """The same documents in every format (split over files where a format has several)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "txt").mkdir()
    for i, d in enumerate(docs):
        (root / "txt" / f"doc{i:03d}.txt").write_text(d)
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    (root / "plain.jsonl").write_text(lines)
    (root / "gzipped.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (root / "zstd.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}),
                   root / "table.parquet", row_group_size=7)  # several row groups
    import datasets

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "hf_saved"))
    return {"txt": root / "txt", "jsonl": root / "plain.jsonl", "gz": root / "gzipped.jsonl.gz",
            "zst": root / "zstd.jsonl.zst", "parquet": root / "table.parquet",
            "arrow": root / "hf_saved"}


def read_all(pattern: str) -> list[str]:
    bad = BadRecords()
    return [d for f in expand_files(pattern) for d in read_documents(f, bad)]


def test_every_format_reads_to_the_documents_of_the_txt_files(tmp_path):
    docs = texts()
    paths = write_formats(tmp_path, docs)
    as_txt = read_all(str(paths["txt"]))  # a folder: the files under it, sorted
    assert as_txt == docs
    for kind in ("jsonl", "gz", "zst", "parquet", "arrow"):
        assert read_all(str(paths[kind])) == docs, kind
    # a glob over a mix of formats, and the folder as a whole (the HF folder counts once)
    assert sorted(read_all(f"{tmp_path}/*.jsonl*,{tmp_path}/*.parquet")) == sorted(docs * 4)
    assert sorted(read_all(str(tmp_path))) == sorted(docs * 6)


def test_every_format_builds_the_same_dataset(tmp_path):
    """Through the TFDS build: the .txt corpus and the parquet + arrow + zstd corpus give the
    same documents in each split (a split is chosen by a hash of the text)."""
    from llama_jax.data.tfds_text import load_dataset

    paths = write_formats(tmp_path / "in", texts())

    def documents(files: str) -> dict[str, list[str]]:
        cfg = load_config("tiny", [f"run_dir={tmp_path / 'r'}", "data.dataset=text_files",
                                   f"data.files={files}", "data.validation_fraction=0.3",
                                   f"data.cache_dir={tmp_path / 'cache'}"])
        ds = load_dataset(cfg.data)
        return {split: sorted(ds.sources[split][i]["text"].decode()
                              for i in range(len(ds.sources[split])))
                for split in ("train", "validation")}

    reference = documents(str(paths["txt"]))
    assert reference["validation"] and reference["train"]
    mixed = documents(f"{paths['parquet']},{paths['arrow']},{paths['zst']}")
    assert mixed == {split: sorted(d * 3) for split, d in reference.items()}


def _bad_files(root: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad data: (file, the one-line message it gives)."""
    root.mkdir()
    good = json.dumps({"text": "fine"}) + "\n"
    cases = {}
    p = root / "text.parquet"
    p.write_text("this is not parquet\n")
    cases["not parquet"] = (p, f"{p}: not readable as parquet")
    p = root / "text.jsonl.gz"
    p.write_text(good)
    cases["not gzip"] = (p, f"{p}: not readable as gzip")
    p = root / "text.jsonl.zst"
    p.write_text(good)
    cases["not zstd"] = (p, f"{p}: not readable as zstd")
    p = root / "columns.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), p)
    cases["no column"] = (p, f"{p}: no column 'text' (columns: body); set data.text_field")
    p = root / "array.jsonl"
    p.write_text(good + "[1, 2]\n")
    cases["not an object"] = (p, f"{p}:2: a JSON list, not an object")
    p = root / "field.jsonl"
    p.write_text(good + good + json.dumps({"body": "x"}) + "\n")
    cases["no field"] = (p, f"{p}:3: no string field 'text'")
    p = root / "bytes.jsonl"
    p.write_bytes(good.encode() + b'{"text": "caf\xe9"}\n')
    cases["not utf-8"] = (p, f"{p}:2: byte 13 is not UTF-8 text")
    p = root / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), p)
    cases["null"] = (p, f"{p} row 2: 'text' is null")
    p = root / "broken.jsonl"
    p.write_text(good + '{"text": "unterminated\n')
    cases["invalid json"] = (p, f"{p}:2: invalid JSON")
    p = root / "corpus.csv"
    p.write_text("text\nhello\n")
    cases["unknown format"] = (p, f"data.files: {p} is not one of .txt, .jsonl, .jsonl.gz")
    return cases


def test_bad_data_is_one_line_naming_the_file_or_skipped_and_counted(tmp_path):
    cases = _bad_files(tmp_path / "bad")
    record_level = {"not an object", "no field", "not utf-8", "null", "invalid json"}
    for name, (path, message) in cases.items():
        with pytest.raises(LlamaJaxError) as e:
            read_all(str(path))
        text = str(e.value)
        assert text.startswith(message) and "\n" not in text, (name, text)
        bad = BadRecords(skip=True)
        if name in record_level:  # skipped and counted; the good records still read
            got = [d for f in expand_files(str(path)) for d in read_documents(f, bad)]
            assert bad.skipped == {str(path): 1} and got, name
        else:  # a whole file that is not what it says is never skipped silently
            with pytest.raises(LlamaJaxError):
                [d for f in expand_files(str(path)) for d in read_documents(f, bad)]


def test_the_cli_refuses_bad_data_in_one_line_and_counts_skips_in_the_metrics(tmp_path):
    good = [json.dumps({"text": t}) for t in texts(60)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join([*good[:30], "[1]", json.dumps({"x": 1}), *good[30:]]) + "\n")
    args = ["configs/tiny.yaml", "data.dataset=text_files", f"data.files={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.validation_fraction=0.2",
            "data.tokenizer_vocab_size=300", "train.steps=2", f"run_dir={tmp_path / 'run'}"]
    refused = run_cli("train", *args)
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == [
        f"llama-jax train: error: {corpus}:31: a JSON list, not an object "
        f"(data.skip_bad_records=true skips such records and counts them)"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    trained = run_cli("train", *args, "data.skip_bad_records=true")
    assert trained.returncode == 0, trained.stderr
    assert f"{corpus}: 2 bad record(s) skipped" in trained.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["skipped_records"] for r in rows if "grad_norm" in r] == [{"text_files": 2}]
