"""Megatron/NeoX `.bin`/`.idx` token files: read back token for token (including files laid
out here byte by byte from the format's description), and every inconsistency refused in one
line naming the file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from llama_jax.data.megatron import IndexedTokens, MegatronDataError, write_indexed


def documents(seed: int, count: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, 50)).tolist() for _ in range(count)]


def handwritten(prefix, docs, code, fmt):
    """The MMIDIDX layout with struct, independent of `write_indexed`."""
    payload = b"".join(struct.pack(f"<{len(d)}{fmt}", *d) for d in docs)
    (prefix.parent / f"{prefix.name}.bin").write_bytes(payload)
    item = struct.calcsize(f"<{fmt}")
    sizes = [len(d) for d in docs]
    pointers = [sum(sizes[:i]) * item for i in range(len(docs))]
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(docs), len(docs) + 1)
    body = (struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(docs)}q", *pointers)
            + struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1)))
    (prefix.parent / f"{prefix.name}.idx").write_bytes(header + body)


@pytest.mark.parametrize("code, fmt, vocab", [(8, "H", 50277), (4, "i", 128256)])
def test_files_laid_out_by_hand_read_back_token_for_token(tmp_path, code, fmt, vocab):
    docs = documents(code, 300, vocab)
    handwritten(tmp_path / "corpus_text_document", docs, code, fmt)
    data = IndexedTokens(tmp_path / "corpus_text_document")
    assert len(data) == 300
    assert data.total_tokens == sum(len(d) for d in docs)
    for i in (0, 1, 137, 299):
        np.testing.assert_array_equal(data[i]["tokens"], docs[i])
        assert data[i]["tokens"].dtype == np.int32


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_write_indexed_round_trips(tmp_path, dtype):
    docs = documents(1, 50, 30000)
    write_indexed(tmp_path / "p", docs, dtype)
    data = IndexedTokens(tmp_path / "p")
    assert [data[i]["tokens"].tolist() for i in range(len(data))] == docs
    assert data.dtype == np.dtype(dtype)


def _damage(tmp_path, how):
    write_indexed(tmp_path / "p", documents(2, 20, 1000))
    idx, bin_ = tmp_path / "p.idx", tmp_path / "p.bin"
    raw = bytearray(idx.read_bytes())
    if how == "magic":
        raw[:7] = b"NOTMMID"
    elif how == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif how == "dtype":
        raw[17] = 6  # float32
    elif how == "short-idx":
        raw = raw[:-8]
    elif how == "short-bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif how == "missing-bin":
        bin_.unlink()
    idx.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, message", [
    ("magic", "p.idx: not an MMIDIDX index (wrong magic)"),
    ("version", "p.idx: MMIDIDX version 2, only 1 is known"),
    ("dtype", "p.idx: dtype code 6 is not a token type"),
    ("short-idx", "p.idx: "),
    ("short-bin", "p.idx does not match"),
    ("missing-bin", "p.bin: no such file"),
])
def test_damaged_pairs_are_refused_in_one_line(tmp_path, how, message):
    _damage(tmp_path, how)
    with pytest.raises(MegatronDataError) as e:
        IndexedTokens(tmp_path / "p")
    text = str(e.value)
    assert message in text and "\n" not in text, text
    assert str(tmp_path) in text


def two_prefixes(tmp_path):
    """Prefix a holds ids 0..499 in short documents, b ids 500..999 in long ones, so a token
    says which prefix it came from and document counts differ from token counts."""
    rng = np.random.default_rng(0)
    if (tmp_path / "b.idx").is_file():
        return [str(tmp_path / "a"), str(tmp_path / "b")]
    write_indexed(tmp_path / "a", [rng.integers(0, 500, rng.integers(10, 60)).tolist()
                                   for _ in range(600)])
    write_indexed(tmp_path / "b", [rng.integers(500, 1000, rng.integers(100, 400)).tolist()
                                   for _ in range(300)])
    return [str(tmp_path / "a"), str(tmp_path / "b")]


def megatron_config(tmp_path, *extra, run="run"):
    from llama_jax.config import load_config

    return load_config("tiny", [f"run_dir={tmp_path / run}", "data.dataset=megatron",
                                f"data.paths={two_prefixes(tmp_path)}", *extra])


def test_blended_prefixes_give_their_token_shares(tmp_path):
    from llama_jax.data.feed import make_source, prepare

    cfg = megatron_config(tmp_path, "data.weights=[0.3,0.7]", "data.prefetch=0")
    data = prepare(cfg)
    source = make_source(cfg, data, "train", 8, 0)
    counts = np.zeros(2)
    for _ in range(200):
        batch = next(source)
        seen = batch["inputs"][batch["segment_ids"] > 0]
        counts += [(seen < 500).sum(), (seen >= 500).sum()]
    share = counts / counts.sum()
    assert share == pytest.approx([0.3, 0.7], abs=0.02)
    assert source.tally.total() == {"a": counts[0], "b": counts[1]}


def test_training_on_token_files_resumes_exactly(tmp_path):
    """20 steps in one go equal 12 steps, then a resume to 20 (a constant learning rate, so
    the two runs' schedules agree although their train.steps differ), the model learns, and
    metrics.jsonl counts each prefix's tokens, at its weight, through the resume."""
    from llama_jax.train import train

    def run(name, steps):
        return train(megatron_config(tmp_path, f"train.steps={steps}", "train.log_every=4",
                                     "data.weights=[0.2,0.8]", "optimizer.schedule=constant",
                                     "train.global_batch_size=16", run=name), quiet=True)

    whole = run("whole", 20)
    run("cut", 12)
    resumed = run("cut", 20)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history[3:]]
    assert whole.evals[-1]["loss"] < whole.evals[0]["loss"]
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").open()]
    counted = [r["tokens_by_source"] for r in rows if "tokens_by_source" in r]
    assert counted == [r["tokens_by_source"] for r in whole.history]
    last = counted[-1]
    seq_len = megatron_config(tmp_path).data.seq_len
    assert sum(last.values()) == 20 * 16 * seq_len  # every position of these rows is a token
    assert last["b"] / sum(last.values()) == pytest.approx(0.8, abs=0.02)


@pytest.mark.parametrize("extra, message", [
    (["data.paths=[]"], "data.dataset=megatron needs data.paths"),
    (["data.weights=[1.0]"], "data.weights has 1 entries for 2 data.paths"),
    (["data.weights=[-1.0,2.0]"], "must be >= 0 with a positive sum"),
])
def test_bad_megatron_settings_are_refused(tmp_path, extra, message):
    from llama_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        megatron_config(tmp_path, *extra)


def test_the_commands_train_prints_work_on_token_files(tmp_path):
    """`train` on token files ends by printing how to evaluate and sample the run; both run
    (sampling takes token ids: such a run has no tokenizer, so evaluating it on text is
    refused unless data.tokenizer names the ids' tokenizer)."""
    import shlex

    from helpers import run_cli

    paths = two_prefixes(tmp_path)
    result = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}",
                     "data.dataset=megatron", f"data.paths=[{','.join(paths)}]",
                     "data.weights=[0.3,0.7]", "train.steps=4")
    assert result.returncode == 0, result.stderr
    printed = [line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
               if line.startswith(("evaluate:", "sample:"))]
    assert len(printed) == 2 and "--prompt-ids" in printed[1], printed
    evaluate, sample = (shlex.split(command) for command in printed)
    assert evaluate[0] == sample[0] == "llama-jax"
    ran = run_cli(*evaluate[1:], "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout.strip().splitlines()[-1])["bits_per_byte"] is None
    ran = run_cli(*sample[1:], "--max-new-tokens", "3")
    assert ran.returncode == 0, ran.stderr
    # Its ids are some other tokenizer's: text tokenized by one trained here is refused.
    ran = run_cli(*evaluate[1:], "data.dataset=python_docs", f"data.cache_dir={tmp_path}")
    lines = ran.stderr.strip().splitlines()
    assert ran.returncode == 2 and len(lines) == 1, ran.stderr
    assert "has no tokenizer (tokenizer.model or tokenizer.json)" in lines[0]
