"""Weighted mixtures of named sources (`data.sources`): token shares, the tally in
metrics.jsonl through a SIGKILL and resume, and evaluation by source."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from helpers import metrics_rows, run_cli

from llama_jax.config import load_config
from llama_jax.errors import ConfigError

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_corpus(path: Path, seed: int, docs: int, words: tuple[int, int], alphabet: str) -> str:
    """A jsonl file of documents whose lengths lie in `words` (so two sources differ in
    document length) and whose words use only `alphabet` (so they differ in text)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for _ in range(docs):
            n = int(rng.integers(*words))
            text = " ".join("".join(rng.choice(list(alphabet), rng.integers(2, 7)))
                            for _ in range(n))
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    long = write_corpus(root / "long.jsonl", 0, 300, (150, 400), LETTERS[:13])
    short = write_corpus(root / "short.jsonl", 1, 1500, (5, 30), LETTERS[13:])
    return root, long, short


def mixture(long: str, short: str, long_weight: float = 0.8) -> str:
    """`data.sources` as one override: a long-document source and a short-document one."""
    entries = [f"{{name: {name}, dataset: text_files, files: '{files}', weight: {weight}}}"
               for name, files, weight in (("long", long, long_weight),
                                           ("short", short, round(1 - long_weight, 6)))]
    return f"data.sources=[{', '.join(entries)}]"


def rows(run_dir: Path) -> list[dict]:
    return metrics_rows(run_dir)


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "grad_norm" in r]


def test_mixture_settings_are_checked_in_one_line(corpora):
    root, long, short = corpora
    base = [f"run_dir={root / 'r'}", f"data.cache_dir={root / 'cache'}"]
    cases = [
        ("data.sources=[{dataset: text_files, files: x}]", "data.sources[0].name is empty"),
        ("data.sources=[{name: a, dataset: text_files, files: x}, "
         "{name: a, dataset: python_docs}]", "data.sources[1].name='a' names two sources"),
        ("data.sources=[{name: a, dataset: synthetic}]", "not synthetic tokens"),
        ("data.sources=[{name: a, dataset: text_files}]", "text_files needs files"),
        ("data.sources=[{name: a, dataset: python_docs, weight: 0}]", "weight=0.0 must be "
                                                                         "positive"),
        ("data.sources=[{name: a, dataset: python_docs}, {name: b, dataset: megatron, "
         "paths: [p]}]", "set data.tokenizer to the tokenizer those ids come from"),
    ]
    for override, message in cases:
        with pytest.raises(ConfigError) as e:
            load_config("tiny", [*base, override])
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_tokens_follow_the_weights_whatever_the_document_lengths(corpora):
    """Documents of the long source are ~20x longer: mixing documents by weight would give it
    ~98% of the tokens; the share of tokens must be the weight."""
    from llama_jax.data.feed import make_source, prepare

    root, long, short = corpora
    for weight in (0.8, 0.3):
        cfg = load_config("tiny", [f"run_dir={root / 'r'}", f"data.cache_dir={root / 'cache'}",
                                   "data.prefetch=0", mixture(long, short, weight)])
        data = prepare(cfg)
        source = make_source(cfg, data, "train", 16, 0)
        for _ in range(100):
            next(source)
        tokens = source.tally.total()
        assert tokens["long"] / sum(tokens.values()) == pytest.approx(weight, abs=0.02)


def test_a_whole_split_scores_each_document_once(corpora):
    """`eval`'s pass over a whole split (`pipeline.whole_split`): each source's documents
    once, in order, packed as training packs them, so every target counts except the one
    across each row boundary inside a document; the last batch of each source filled out
    with empty rows. The count is made independently, from the documents' token lengths.
    (The repeating stream it replaced wrapped around to fill its last batch.)"""
    from llama_jax.data.pipeline import prepare_data, whole_split
    from llama_jax.data.tokenizer import as_text, load_tokenizer

    root, long, short = corpora
    cfg = load_config("tiny", [f"run_dir={root / 'r'}", f"data.cache_dir={root / 'cache'}",
                               mixture(long, short)])
    data = prepare_data(cfg)
    rows, length = cfg.train.global_batch_size, cfg.data.seq_len + 1
    batches = list(whole_split(cfg, data, "validation", rows))
    assert {b["inputs"].shape for b in batches} == {(rows, cfg.data.seq_len)}
    tokenizer = load_tokenizer(data.tokenizer.path, cfg.data.add_bos, cfg.data.add_eos)
    first_batch = 0
    for index, src in enumerate(data.sources):
        documents = [tokenizer.encode(as_text(d[src.text_key])) for d in src.splits["validation"]]
        total = sum(map(len, documents))
        starts = set(np.cumsum([0] + [len(d) for d in documents[:-1]]).tolist())
        cut_inside = len(set(range(length, total, length)) - starts)
        count = math.ceil(math.ceil(total / length) / rows)  # batches of this source's rows
        mine = batches[first_batch:first_batch + count]
        first_batch += count
        assert mine[0]["inputs"][0, :8].tolist() == documents[0][:8]  # in order, from the first
        assert all((b["source"][b["segment_ids"] > 0] == index).all() for b in mine)
        scored = sum(float(b["weights"].sum()) for b in mine)
        assert scored == sum(len(d) - 1 for d in documents) - cut_inside
    assert first_batch == len(batches)


def _kill_at(run_dir: Path, args: list[str], step: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = train_rows(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        if done and done[-1]["step"] >= step:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_mixture_resumes_exactly_after_sigkill_and_evaluates_by_source(tmp_path, corpora):
    """100 steps at 0.8/0.2: `tokens_by_source` within 2 points of the weights; a run killed
    after step 60 (checkpoint 50 complete) and resumed writes the same rows, tally included,
    as the uninterrupted one; `eval --json` gives each source's loss, which together make
    the overall loss."""
    root, long, short = corpora
    args = ["configs/tiny.yaml", f"data.cache_dir={root / 'cache'}", mixture(long, short),
            "train.steps=100", "train.log_every=10", "checkpoint.every=50",
            "data.prefetch=2"]
    full = run_cli("train", *args, f"run_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    killed = tmp_path / "killed"
    _kill_at(killed, ["train", *args, f"run_dir={killed}"], 60)
    assert train_rows(killed)[-1]["step"] < 100
    resumed = run_cli("train", *args, f"run_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert untimed(train_rows(killed)) == untimed(train_rows(tmp_path / "full"))
    tokens = train_rows(killed)[-1]["tokens_by_source"]
    tiny = load_config("tiny")
    assert sum(tokens.values()) == 100 * tiny.train.global_batch_size * tiny.data.seq_len
    assert tokens["long"] / sum(tokens.values()) == pytest.approx(0.8, abs=0.02)
    epochs = train_rows(killed)[-1]["epochs_by_source"]
    assert set(epochs) == {"long", "short"} and all(v > 0 for v in epochs.values())

    # More batches than the split holds: one pass, with a note (the split would repeat).
    result = run_cli("eval", str(killed), "--json", "--batches", "100000")
    assert result.returncode == 0, result.stderr
    assert re.search(r"note: the validation split holds about [\d,]+ batch\(es\) of 8 x 64 "
                     r"tokens; evaluating all of it once, not 100,000 batches", result.stderr), \
        result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    by_source, counted = out["loss_by_source"], out["tokens_by_source"]
    assert set(by_source) == {"long", "short"} and sum(counted.values()) == out["tokens"]
    weighted = sum(by_source[k] * counted[k] for k in by_source) / out["tokens"]
    assert weighted == pytest.approx(out["loss"], rel=1e-5)
    assert by_source["long"] != pytest.approx(by_source["short"], rel=1e-3)
    evals = [r for r in rows(killed) if "loss_by_source" in r]
    assert evals and set(evals[-1]["loss_by_source"]) == {"long", "short"}


TIMING = ("tokens_per_sec", "step_time_s", "mfu", "data_wait_s", "host_rss_gib")


def untimed(table: list[dict]) -> list[dict]:
    """Rows without the figures that depend on wall time."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in table]


def test_the_readme_mixture_example_loads_and_mixes(tmp_path, corpora):
    """The README's `data.sources` block, with its globs pointed at this test's corpora."""
    import re

    import yaml

    from llama_jax.data.feed import prepare

    root, long, short = corpora
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "sources:" in b)
    example = yaml.safe_load(block)
    globs = [s["files"] for s in example["data"]["sources"]]
    config = tmp_path / "mix.yaml"
    config.write_text("base: tiny\n" + block.replace(globs[0], long).replace(globs[1], short))
    cfg = load_config(config, [f"run_dir={tmp_path / 'r'}", f"data.cache_dir={root / 'cache'}"])
    data = prepare(cfg)
    assert [(s.name, s.weight) for s in data.sources] == [
        (s["name"], pytest.approx(s["weight"])) for s in example["data"]["sources"]]
