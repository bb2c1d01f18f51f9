"""The data pipeline: determinism, sharding, packing, resumption, and bad input."""

from __future__ import annotations

import json
import re

import grain
import jax
import numpy as np
import pytest
from conftest import CONFIGS
from flax import nnx
from helpers import run_cli

from llama_jax.config import load_config
from llama_jax.data.mixture import Source, mixed_documents
from llama_jax.data.pipeline import TextPipeline, model_row, prepare_data
from llama_jax.model import Transformer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Sixty real English documents (pydoc topics) as .txt and .jsonl files."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("corpus")
    names = sorted(topics)[:60]
    for name in names[:30]:
        (root / f"{name}.txt").write_text(topics[name])
    with (root / "more.jsonl").open("w") as f:
        for name in names[30:]:
            f.write(json.dumps({"text": topics[name]}) + "\n")
    return root


def data_cfg(corpus, tmp_path, *extra):
    return load_config(CONFIGS / "tiny.yaml", [
        "data.dataset=text_files", f"data.files={corpus}/*.txt,{corpus}/*.jsonl",
        f"data.cache_dir={tmp_path}/cache", "model.vocab_size=512", "data.seq_len=64",
        "data.validation_fraction=0.2", "data.prefetch=0", *extra])


def take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_seeded_determinism_and_resumption(corpus, tmp_path):
    cfg = data_cfg(corpus, tmp_path)
    data = prepare_data(cfg)
    assert data.tokenizer.vocab_size == 512
    assert 1.0 < data.bytes_per_token["train"] < 8.0
    first = take(TextPipeline(cfg, data, "train", 4, seed=1), 6)
    again = take(TextPipeline(cfg, data, "train", 4, seed=1), 6)
    other = take(TextPipeline(cfg, data, "train", 4, seed=2), 6)
    assert same(first, again)
    assert not same(first, other)
    # Save the state after 3 batches; a fresh iterator restored from it continues exactly.
    pipe = TextPipeline(cfg, data, "train", 4, seed=1)
    take(pipe, 3)
    state = pipe.get_state()
    resumed = TextPipeline(cfg, data, "train", 4, seed=1)
    resumed.set_state(json.loads(json.dumps(state)))  # state survives a JSON round trip
    assert same(take(resumed, 3), first[3:])


def test_prefetching_pipeline_resumes_exactly(corpus, tmp_path):
    cfg = data_cfg(corpus, tmp_path, "data.prefetch=3")
    data = prepare_data(cfg)
    reference = take(TextPipeline(cfg, data, "train", 4, seed=5), 8)
    pipe = TextPipeline(cfg, data, "train", 4, seed=5)
    take(pipe, 5)
    state = pipe.get_state()
    pipe.close()
    resumed = TextPipeline(cfg, data, "train", 4, seed=5)
    resumed.set_state(state)
    assert same(take(resumed, 3), reference[5:])
    resumed.close()


def test_a_resume_on_changed_data_says_so(corpus, tmp_path, capsys):
    """The data position is saved with a fingerprint of the corpus: restored onto a corpus
    that changed since (a file appended to), or by another number of processes than saved
    it, it warns, since the run no longer reads what an uninterrupted one would; on the same
    corpus and processes it says nothing."""
    import shutil

    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    cfg = data_cfg(copy, tmp_path)
    data = prepare_data(cfg)
    pipe = TextPipeline(cfg, data, "train", 4, seed=1)
    take(pipe, 2)
    state = json.loads(json.dumps(pipe.get_state()))
    capsys.readouterr()
    TextPipeline(cfg, data, "train", 4, seed=1).set_state(state)
    assert "changed since this checkpoint" not in capsys.readouterr().err
    with (copy / "more.jsonl").open("a") as f:
        f.write(json.dumps({"text": "A document added later. " * 40}) + "\n")
    TextPipeline(cfg, prepare_data(cfg), "train", 4, seed=1).set_state(state)
    assert "data source text_files changed since this checkpoint" in capsys.readouterr().err
    # A position saved by two processes (each reads its own share of the documents) cannot
    # be continued by one: it says so too.
    pipe = TextPipeline(cfg, prepare_data(cfg), "train", 4, seed=1)
    take(pipe, 1)
    two = {**pipe.get_state(), "iterators": [state["iterator"], state["iterator"]]}
    capsys.readouterr()
    TextPipeline(cfg, prepare_data(cfg), "train", 4, seed=1).set_state(two)
    assert "saved by 2 process(es) and this run has 1" in capsys.readouterr().err


def test_a_second_builder_of_a_data_cache_waits_for_the_first(corpus, tmp_path):
    """While another process holds the cache's build lock, `prepare-data` says it waits and
    builds nothing; once the lock is let go it builds. (Two builders at once interleaved the
    python_docs corpus file and removed each other's half-written shards.)"""
    import fcntl
    import os
    import subprocess
    import sys

    from conftest import ROOT

    cache = tmp_path / "cache"
    cache.mkdir()
    held = os.open(cache / ".build.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    cfg = data_cfg(corpus, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_jax.cli", "prepare-data", "configs/tiny.yaml",
         "data.dataset=text_files", f"data.files={cfg.data.files}", f"data.cache_dir={cache}",
         "model.vocab_size=512", "data.validation_fraction=0.2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = proc.stderr.readline()
        assert said.startswith(f"waiting for another process that is building {cache}"), said
        assert sorted(p.name for p in cache.iterdir()) == [".build.lock"]
    finally:
        os.close(held)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert re.search(r"[\d,]+ train / [\d,]+ validation", out), out


def numbered(n: int, start: int = 0) -> Source:
    """A token-id source whose document i is the one token start + i."""
    docs = grain.MapDataset.source([{"tokens": np.array([start + i])} for i in range(n)])
    return Source(f"from{start}", 1.0, {"train": docs}, None, stats={"train": {"tokens": n}})


def doc_ids(ds, stop: int, start: int = 0) -> list[int]:
    return [int(ds[i]["tokens"][0]) for i in range(start, stop)]


def test_process_shards_are_disjoint_and_cover_the_epoch():
    n = 40
    shards = [doc_ids(mixed_documents([numbered(n)], "train", 7, True, pi, 2), n // 2)
              for pi in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(n))
    # The next epoch is shuffled again.
    one = mixed_documents([numbered(n)], "train", 7, True, 0, 1)
    assert doc_ids(one, n) != doc_ids(one, 2 * n, n)
    # Two sources (equal token shares): each process gets its own documents of both.
    two = [numbered(n), numbered(n, 1000)]
    shards = [doc_ids(mixed_documents(two, "train", 7, True, pi, 2), n) for pi in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert all(any(d >= 1000 for d in s) and any(d < 1000 for d in s) for s in shards)


def test_rows_mask_document_boundaries():
    seg = np.array([1, 1, 1, 2, 2, 2, 2, 3, 3, 0])
    packed = {"tokens": np.arange(10), "tokens_segment_ids": seg, "source": np.zeros(10)}
    row = model_row(packed)
    np.testing.assert_array_equal(row["inputs"], np.arange(9))
    np.testing.assert_array_equal(row["targets"], np.arange(1, 10))
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(row["weights"], [1, 1, 0, 1, 1, 1, 0, 1, 0])


@pytest.mark.usefixtures("unsharded")
def test_packed_rows_from_the_pipeline_keep_documents_apart(corpus, tmp_path):
    cfg = data_cfg(corpus, tmp_path, "data.seq_len=128")
    data = prepare_data(cfg)
    pipe = TextPipeline(cfg, data, "train", 8, seed=0)
    # a row that holds the end of one document and the start of another
    batch, row = next((b, i) for b in (next(pipe) for _ in range(100)) for i in range(8)
                      if len(set(b["segment_ids"][i])) > 1)
    seg = batch["segment_ids"][row]
    boundary = int(np.argmax(seg != seg[0]))
    assert batch["positions"][row][boundary] == 0
    model = Transformer(cfg.model, nnx.Rngs(0))
    args = [jax.numpy.asarray(batch[k][row:row + 1])
            for k in ("inputs", "positions", "segment_ids")]
    changed = args[0].at[:, :boundary].set((args[0][:, :boundary] + 5) % cfg.model.vocab_size)
    before = model(*args)
    after = model(changed, *args[1:])
    np.testing.assert_allclose(before[:, boundary:], after[:, boundary:], rtol=1e-5, atol=1e-5)


def test_long_documents_are_split_across_rows(tmp_path):
    from pydoc_data.topics import topics

    long_text = " ".join(topics[k] for k in sorted(topics)[:40])
    (tmp_path / "long.txt").write_text(long_text)
    (tmp_path / "other.txt").write_text(topics["if"])
    cfg = load_config(CONFIGS / "tiny.yaml", [
        "data.dataset=text_files", f"data.files={tmp_path}/*.txt", "model.vocab_size=512",
        f"data.cache_dir={tmp_path}/cache", "data.seq_len=32", "data.validation_fraction=0.5",
        "data.prefetch=0"])
    data = prepare_data(cfg)
    n_tokens = len(data.tokenizer.encode(long_text))
    assert n_tokens > 20 * 33
    batch = next(TextPipeline(cfg, data, "train", 16, seed=0, shuffle=False))
    assert batch["positions"].max() < 32
    assert batch["weights"].mean() > 0.95  # nothing padded: rows are filled with the document
    # Read row after row, the batch is the encoded document itself from where it starts: each
    # row continues the previous one (a truncating packer would jump to the next document).
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)  # 33 each
    stream = rows.reshape(-1).tolist()
    doc = data.tokenizer.encode(long_text)
    start = next(i for i in range(len(stream)) if stream[i:i + 8] == doc[:8])
    assert len(stream) - start >= 4 * 33
    assert stream[start:] == doc[:len(stream) - start]


def test_non_utf8_text_is_refused_in_one_line_or_skipped_and_counted(tmp_path):
    from pydoc_data.topics import topics

    for i, name in enumerate(sorted(topics)[:30]):
        tail = b"\xff\xfe" if i == 3 else b""
        (tmp_path / f"d{i}.txt").write_bytes(topics[name].encode() + tail)
    args = ["prepare-data", "configs/tiny.yaml", "data.dataset=text_files",
            f"data.files={tmp_path}/*.txt", f"data.cache_dir={tmp_path}/cache",
            "model.vocab_size=512", "data.validation_fraction=0.3"]
    refused = run_cli(*args)
    assert refused.returncode != 0
    offset = len(topics[sorted(topics)[3]].encode())
    assert refused.stderr.strip().splitlines() == [
        f"llama-jax prepare-data: error: {tmp_path}/d3.txt: byte {offset} is not UTF-8 "
        f"text (data.skip_bad_records=true skips such records and counts them)"]
    skipped = run_cli(*args, "data.skip_bad_records=true")
    assert skipped.returncode == 0, skipped.stderr
    assert f"{tmp_path}/d3.txt: 1 bad record(s) skipped" in skipped.stderr
    train, validation = (int(n.replace(",", "")) for n in re.search(
        r"([\d,]+) train / ([\d,]+) validation", skipped.stdout).groups())
    assert train + validation == 29


@pytest.mark.parametrize("setup, overrides, message", [
    (None, ["data.files={root}/nothing*.txt"], "data.files: no file matches '{root}/nothing*.txt'"),
    ("empty", ["data.files={root}/*.txt"], "has no text"),
    (None, ["data.dataset=no_such_dataset_xyz"],
     "data.dataset: no TFDS dataset named 'no_such_dataset_xyz'"),
    ("corpus", ["data.files={root}/*.txt", "data.tokenizer={root}/missing.model"],
     "data.tokenizer: file not found: {root}/missing.model"),
    ("corpus", ["data.files={root}/*.txt", "model.vocab_size=400",
                "data.tokenizer={root}/big.model"], "has 512 pieces but model.vocab_size=400"),
    ("badjson", ["data.files={root}/*.jsonl"], "{root}/bad.jsonl:2: invalid JSON"),
    ("small", ["data.files={root}/*.txt", "data.validation_fraction=0.5"],
     "could not train a 512-piece tokenizer (the size is data.tokenizer_vocab_size, or "
     "model.vocab_size where that is 0): Vocabulary size too high (512). Please set it to"),
])
def test_bad_input_gives_one_line(tmp_path, setup, overrides, message):
    from pydoc_data.topics import topics

    root = tmp_path / "in"
    root.mkdir()
    if setup == "empty":
        (root / "a.txt").write_text("")
        (root / "b.txt").write_text("   \n")
    if setup == "corpus":
        for name in sorted(topics)[:30]:
            (root / f"{name}.txt").write_text(topics[name])
        cfg = load_config(CONFIGS / "tiny.yaml", [
            "data.dataset=text_files", f"data.files={root}/*.txt", "model.vocab_size=512",
            f"data.cache_dir={tmp_path}/cache0", "data.validation_fraction=0.3"])
        import shutil

        shutil.copy(prepare_data(cfg).tokenizer.path, root / "big.model")
    if setup == "small":
        for i in range(8):
            (root / f"{i}.txt").write_text(f"corpus {i}, too small for 512 pieces\n" * 20)
    if setup == "badjson":
        (root / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    args = [o.format(root=root) for o in overrides]
    result = run_cli("prepare-data", "configs/tiny.yaml", "data.dataset=text_files",
                     f"data.cache_dir={tmp_path}/cache", "model.vocab_size=512", *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert message.format(root=root) in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_a_resumed_run_keeps_its_tokenizer_when_the_data_cache_is_gone(corpus, tmp_path,
                                                                        capsys):
    """The tokenizer trained for a run is its copy in the run directory: a resume after the
    data cache was deleted (or rebuilt from other bytes) must not train another one, and
    continues the uninterrupted run exactly."""
    import shutil

    from llama_jax.train import train

    def run(name: str, steps: int):
        cfg = data_cfg(corpus, tmp_path, f"run_dir={tmp_path / name}", f"train.steps={steps}",
                       "train.log_every=1", "optimizer.schedule=constant")
        return train(cfg, quiet=True)

    whole = run("whole", 4)
    run("cut", 2)
    first = (tmp_path / "cut" / "tokenizer.model").read_bytes()
    shutil.rmtree(tmp_path / "cache")
    capsys.readouterr()
    resumed = run("cut", 4)
    assert "sentencepiece tokenizer" not in capsys.readouterr().err  # none trained
    assert (tmp_path / "cut" / "tokenizer.model").read_bytes() == first
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history[2:]]
