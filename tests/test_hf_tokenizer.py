"""HF tokenizers' `tokenizer.json` (Llama 3, Pythia/GPT-NeoX and most HF folders ship only
that): encoded as transformers encodes it, and a run trained, evaluated, sampled, exported and
imported with one. lm-eval scores on such folders are compared with lm-eval's own `hf` model
in test_harness.py."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import run_cli, write_hf_tokenizer

from llama_jax.data.tokenizer import load_tokenizer
from llama_jax.errors import LlamaJaxError

TEXTS = ["def f(x):\n    return x + 1", "  two leading spaces", "naïve café, 日本語 ✓", "",
         "a\n\nb\tc"]


@pytest.fixture(scope="module", params=["llama3", "neox"])
def folder(request, tmp_path_factory):
    where = tmp_path_factory.mktemp(request.param)
    write_hf_tokenizer(where, begins_with_bos=request.param == "llama3")
    return where


def test_ids_specials_and_text_are_transformers(folder, tmp_path):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(folder / "tokenizer.json", add_eos=False)
    ours.add_bos = ours.adds_bos()  # the framing its own post-processor gives
    assert ours.adds_bos() == (folder.name.startswith("llama3"))
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.vocab_size == len(theirs)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text
    assert ours.encode_batch(TEXTS) == [theirs.encode(t) for t in TEXTS]
    framed = ours.encode("x", bos=True, eos=True)
    assert framed[0] == ours.bos_id and framed[-1] == ours.eos_id

    # What a run keeps of it (tokenizer.json and its config) loads as the same tokenizer.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, content in ours.files().items():
        (copy / name).write_bytes(content)
    again = load_tokenizer(copy / "tokenizer.json", ours.add_bos, False)
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert again.digest() == ours.digest()


def test_specials_come_from_the_post_processor_without_a_config(folder, tmp_path,
                                                                 capsys):
    """A tokenizer.json alone: Llama 3's post-processor names its BOS; GPT-NeoX's names none,
    and with nothing naming an EOS, documents are packed without one."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "tokenizer.json", alone)
    tok = load_tokenizer(alone / "tokenizer.json")
    if folder.name.startswith("llama3"):
        assert tok.bos_id == tok.hf.token_to_id("<|begin_of_text|>") and tok.adds_bos()
    else:
        assert tok.bos_id == -1 and not tok.adds_bos()
    assert tok.eos_id == -1
    assert tok.encode("x") == tok.encode("x", bos=True, eos=True)[: len(tok.encode("x"))]
    # Training with it says what the documents go without.
    from llama_jax.config import load_config
    from llama_jax.data.pipeline import prepare_data

    cfg = load_config("tiny", ["data.dataset=python_docs", f"data.tokenizer={alone}"])
    prepare_data(cfg)
    missing = "EOS" if tok.bos_id >= 0 else "BOS or EOS"
    assert f"note: tokenizer {alone / 'tokenizer.json'} has no {missing} token" in \
        capsys.readouterr().err


def test_unreadable_tokenizers_are_one_line(folder, tmp_path):
    torn = tmp_path / "torn"
    torn.mkdir()
    data = (folder / "tokenizer.json").read_bytes()
    (torn / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(LlamaJaxError, match=r"torn/tokenizer.json is not an HF tokenizer.json"):
        load_tokenizer(torn / "tokenizer.json")
    (torn / "tokenizer.json").write_bytes(data)
    (torn / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nowhere|>"}))
    with pytest.raises(LlamaJaxError, match=r"eos_token '<\|nowhere\|>' is not in "):
        load_tokenizer(torn / "tokenizer.json")
    (torn / "tokenizer_config.json").write_text("{")
    with pytest.raises(LlamaJaxError, match=r"tokenizer_config.json: not readable JSON"):
        load_tokenizer(torn / "tokenizer.json")
    (torn / "tokenizer.json").write_bytes(b"\x00\x01 neither format")
    with pytest.raises(LlamaJaxError, match="is not a sentencepiece model, nor an HF"):
        load_tokenizer(torn / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlamaJaxError, match=r"empty is a folder without tokenizer.model or "
                                            r"tokenizer.json$"):
        load_tokenizer(tmp_path / "empty")


def test_a_folder_names_the_tokenizer_it_holds(folder):
    """`data.tokenizer` may name an HF model's folder, as its users have one at hand."""
    whole = load_tokenizer(folder)
    assert whole.path == folder / "tokenizer.json"
    assert [whole.encode(t) for t in TEXTS] == [
        load_tokenizer(folder / "tokenizer.json").encode(t) for t in TEXTS]


def _eval(path, *overrides) -> dict:
    done = run_cli("eval", str(path), "--json", *overrides)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_run_with_a_tokenizer_json_trains_evaluates_samples_and_round_trips(tmp_path):
    """GPT-NeoX's kind, trained without BOS (as Pythia was): the run keeps the tokenizer, its
    HF export carries it and transformers reads it, and the export (read in place, and
    imported back) scores the validation split as the run does, framing texts as its own
    tokenizer does."""
    from transformers import AutoTokenizer

    source = write_hf_tokenizer(tmp_path / "neox", begins_with_bos=False)
    run, hf, back = tmp_path / "run", tmp_path / "hf", tmp_path / "back"
    done = run_cli("train", "tiny", f"run_dir={run}", "data.dataset=python_docs",
                   f"data.tokenizer={source.parent}", "data.add_bos=false", "train.steps=4",
                   "train.eval_every=0", "train.log_every=2")
    assert done.returncode == 0, done.stderr
    assert (run / "tokenizer.json").read_bytes() == source.read_bytes()
    assert json.loads((run / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    scored = _eval(run, "--batches", "2")
    assert scored["bits_per_byte"] > 0

    sampled = run_cli("generate", str(run), "--prompt", "def", "--max-new-tokens", "4",
                      "--temperature", "0")
    assert sampled.returncode == 0 and "def" in sampled.stdout, sampled.stderr

    assert run_cli("convert", "orbax-to-hf", str(run), str(hf)).returncode == 0
    assert (hf / "tokenizer.json").read_bytes() == source.read_bytes()
    theirs = AutoTokenizer.from_pretrained(str(hf))
    assert theirs.encode(TEXTS[0]) == load_tokenizer(source, False, False).encode(TEXTS[0])
    data = ["data.dataset=python_docs", "data.seq_len=64", "train.global_batch_size=8"]
    assert _eval(hf, "--batches", "2", *data)["loss"] == pytest.approx(scored["loss"], rel=1e-5)

    assert run_cli("convert", "hf-to-orbax", str(hf), str(back)).returncode == 0
    assert (back / "tokenizer.json").read_bytes() == source.read_bytes()
    assert _eval(back, "--batches", "2", *data)["loss"] == pytest.approx(scored["loss"],
                                                                      rel=1e-5)

    # Further training from the export tokenizes with its tokenizer.json.
    tuned = run_cli("train", "tiny", f"run_dir={tmp_path / 'tuned'}", "data.dataset=python_docs",
                    f"checkpoint.restore_from={hf}", "checkpoint.restore_params_only=true",
                    "data.add_bos=false", "train.steps=2", "train.eval_every=0")
    assert tuned.returncode == 0, tuned.stderr
    assert f"note: tokenizing with {hf / 'tokenizer.json'}" in tuned.stderr
    assert (tmp_path / "tuned" / "tokenizer.json").read_bytes() == source.read_bytes()
