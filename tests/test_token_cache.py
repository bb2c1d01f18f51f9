"""Tokenize once (`prepare-data`): the cached token ids are the tokenizer's own encoding of
every document, in the split the text path puts it; re-running skips finished files, a
changed file rebuilds only its own shards; training reads the cache and says so, and a run
may switch between text and the cache on resume."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import foreground_job, run_cli
from test_mixture import LETTERS, write_corpus

from llama_jax.config import load_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three files, and a tokenizer trained once on them (the tests fix it with
    data.tokenizer, so that changing a file changes that file only)."""
    root = tmp_path_factory.mktemp("token_cache")
    for i in range(3):
        write_corpus(root / f"part{i}.jsonl", i, 120, (20, 120), LETTERS)
    first = run_cli("prepare-data", "configs/tiny.yaml", "data.dataset=text_files",
                    f"data.files={root}/part*.jsonl", f"data.cache_dir={root / 'warm'}",
                    "data.token_cache=false")
    assert first.returncode == 0, first.stderr
    model = re.search(r"tokenizer (\S+\.model):", first.stdout).group(1)
    return root, model


def args(root: Path, model: str, cache: Path, *extra: str) -> list[str]:
    return ["configs/tiny.yaml", "data.dataset=text_files", f"data.files={root}/part*.jsonl",
            f"data.cache_dir={cache}", f"data.tokenizer={model}", *extra]


def written(cache: Path) -> dict[str, float]:
    """Each finished file folder and when its shards were written."""
    return {p.parent.name: p.stat().st_mtime_ns
            for p in cache.glob("tokens/*/*/train.array_record")}


def test_cached_ids_are_the_tokenizers_encoding_of_each_split(tmp_path, corpus):
    from llama_jax.data.feed import prepare
    from llama_jax.data.tfds_text import load_dataset
    from llama_jax.data.token_cache import cached_files, token_stats
    from llama_jax.data.tokenizer import load_tokenizer

    root, model = corpus
    cache = tmp_path / "cache"
    done = run_cli("prepare-data", *args(root, model, cache, "data.num_workers=2"))
    assert done.returncode == 0, done.stderr
    assert "token ids written for 3 file(s), 0 already done" in done.stdout
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'r'}", *args(root, model, cache)[1:]])
    data = prepare(cfg)
    (src,) = data.sources
    assert src.reads == "tokens"
    # the reference: the text path's documents of each split, encoded by the tokenizer
    text = load_dataset(cfg.data)
    tok = load_tokenizer(model)
    for split in ("train", "validation"):
        expected = Counter(tuple(tok.encode(text.sources[split][i]["text"].decode()))
                           for i in range(len(text.sources[split])))
        got = Counter(tuple(src.splits[split][i]["tokens"].tolist())
                      for i in range(len(src.splits[split])))
        assert got == expected and got, split
        exact = token_stats(cached_files(cfg.data, tok, src.files))[split]["tokens"]
        assert exact == sum(len(k) * n for k, n in expected.items())
    # the same shards, byte for byte, when tokenized in this process
    serial = tmp_path / "serial"
    assert run_cli("prepare-data", *args(root, model, serial, "data.num_workers=0")
                   ).returncode == 0
    for shard in cache.glob("tokens/*/*/*.array_record"):
        twin = serial / shard.relative_to(cache)
        assert twin.read_bytes() == shard.read_bytes(), shard


def test_rerunning_skips_finished_files_and_a_changed_file_rebuilds_alone(tmp_path, corpus):
    root, model = corpus
    files = tmp_path / "files"
    files.mkdir()
    for p in root.glob("part*.jsonl"):
        (files / p.name).write_bytes(p.read_bytes())
    cache = tmp_path / "cache"
    command = ["prepare-data", *args(files, model, cache)]
    assert run_cli(*command).returncode == 0
    before = written(cache)
    again = run_cli(*command)
    assert "token ids written for 0 file(s), 3 already done" in again.stdout, again.stdout
    assert written(cache) == before
    with (files / "part1.jsonl").open("a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    changed = run_cli(*command)
    assert "token ids written for 1 file(s), 2 already done" in changed.stdout, changed.stdout
    after = written(cache)
    kept = {k: v for k, v in after.items() if not k.startswith("part1")}
    assert kept == {k: v for k, v in before.items() if not k.startswith("part1")}
    assert len(after) == 4  # the old part1 folder is left (another run may still read it)


def test_training_reads_the_cache_says_so_and_a_text_run_resumes_on_it_exactly(tmp_path, corpus,
                                                                                 capsys):
    """The token cache holds the text path's documents in the text path's order: a run that
    began on text and resumes on the cache equals one that read text throughout."""
    from llama_jax.train import train

    root, model = corpus
    cache = tmp_path / "cache"

    def run(name: str, steps: int, *extra: str):
        cfg = load_config("tiny", [*args(root, model, cache)[1:], f"run_dir={tmp_path / name}",
                                   f"train.steps={steps}", "train.log_every=1",
                                   "optimizer.schedule=constant", *extra])
        return train(cfg, quiet=True)

    run("cut", 3)
    assert "tokenizing text as it trains" in capsys.readouterr().err
    whole = run("whole", 6, "data.token_cache=false")
    assert run_cli("prepare-data", *args(root, model, cache)).returncode == 0
    capsys.readouterr()
    resumed = run("cut", 6)
    assert "reading token ids (tokenized once by prepare-data)" in capsys.readouterr().err
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history[3:]]
    assert np.isfinite([r["loss"] for r in whole.history]).all()


def test_ctrl_c_while_workers_start_is_one_line(tmp_path, corpus):
    """A Ctrl-C reaches the terminal's whole process group: the tokenizing workers, still
    importing, ignore it (each printed a KeyboardInterrupt traceback), and prepare-data says
    it was interrupted, exits 130 and leaves no half-written shards."""
    import os
    import signal
    import sys
    import time

    import psutil

    root, model = corpus
    cache = tmp_path / "cache"
    proc = foreground_job([sys.executable, "-m", "llama_jax.cli", "prepare-data",
                           *args(root, model, cache, "data.num_workers=2")])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and sum(
            "spawn_main" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children()) < 2:
        time.sleep(0.02)
    time.sleep(0.3)  # the workers are importing
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == \
        "llama-jax prepare-data: interrupted", err
    assert not list(cache.rglob("*.partial"))
