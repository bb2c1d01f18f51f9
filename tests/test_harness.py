"""lm-evaluation-harness on the mesh (harness.py): our scores against lm-eval's own `hf` model
on the same weights exported to HF, across two mesh layouts, from the CLI, in the training
loop, and the one-line refusals. Everything is offline: the tasks are defined here, over
local JSON lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, metrics_rows, run_cli, write_hf_tokenizer

pytest.importorskip("lm_eval")
sys.path.insert(0, str(ROOT / "scripts"))
from python_docs_tasks import multiple_choice_yaml  # noqa: E402

TASKS = ["next_words_choice", "next_words", "docs_rolling"]
LIMIT = 12


def _task_folder(folder: Path) -> Path:
    """Three local tasks over the python_docs corpus: the log-likelihood of whole documents
    longer than the model's 512 positions (rolling windows), pick the true next four words
    of a sentence among three others' (multiple choice), and write the next two words
    (generation,
    six tokens: a briefly trained model's are mostly newlines, which a stop string would
    cut to nothing, leaving nothing compared)."""
    corpus = ROOT / "data_cache" / "corpus"
    documents = [json.loads(line)["text"] for line in
                 next(corpus.glob("python_docs-*.jsonl")).read_text().splitlines()[:100]]
    text = "\n".join(documents)
    sentences = [" ".join(p.split()) for p in text.split("\n") if len(p.split()) >= 12][:60]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "choice.jsonl", "w") as f:
        for i, s in enumerate(sentences[:30]):
            words = s.split(" ")
            others = [" ".join(sentences[(i * 7 + 11 * k + 3) % len(sentences)]
                               .split(" ")[8:12]) for k in range(1, 4)]
            label = i % 4
            choices = others[:label] + [" ".join(words[8:12])] + others[label:]
            f.write(json.dumps({"context": " ".join(words[:8]), "choices": choices,
                                "label": label}) + "\n")
    with open(folder / "words.jsonl", "w") as f:
        for s in sentences[30:]:
            words = s.split(" ")
            f.write(json.dumps({"prompt": " ".join(words[:6]),
                                "answer": " " + " ".join(words[6:8])}) + "\n")
    (folder / "choice.yaml").write_text(multiple_choice_yaml(TASKS[0], folder / "choice.jsonl"))
    long_documents = [json.dumps({"text": d[:2500]}) + "\n" for d in documents
                      if len(d) > 2500][:4]
    (folder / "docs.jsonl").write_text("".join(long_documents))
    (folder / "docs.yaml").write_text(f"""task: docs_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'docs.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    (folder / "words.yaml").write_text(f"""task: next_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'words.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["@@@"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny float32 model trained briefly on python_docs, its HF export, and the tasks."""
    base = tmp_path_factory.mktemp("harness")
    run = base / "run"
    done = run_cli("train", "configs/tiny.yaml", f"run_dir={run}", "data.dataset=python_docs",
                   "train.steps=30", "train.eval_every=0", "train.log_every=10")
    assert done.returncode == 0, done.stderr
    hf = base / "hf"
    done = run_cli("convert", "orbax-to-hf", str(run), str(hf))
    assert done.returncode == 0, done.stderr
    return {"run": run, "hf": hf, "tasks": _task_folder(base / "tasks")}


def _ours(trained: dict[str, Path], overrides: list[str], model: Path | None = None) -> dict:
    """Our scores of the run (or of `model`, a run or an HF folder)."""
    from llama_jax import api
    from llama_jax.harness import MeshLM, evaluate_tasks

    model = api.load(model or trained["run"], overrides)
    lm = MeshLM(model.loaded.graphdef, model.loaded.params, model.loaded.setup,
                model.loaded.tokenizer, batch_size=8)
    return evaluate_tasks(lm, TASKS, limit=LIMIT, include_path=str(trained["tasks"]),
                          log_samples=True, bootstrap_iters=0)


def _theirs(trained: dict[str, Path], hf: Path) -> dict:
    """lm-eval's own `hf` model's scores of an HF folder."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    reference = HFLM(pretrained=str(hf), dtype="float32", batch_size=8, device="cpu")
    return simple_evaluate(model=reference, tasks=TASKS, limit=LIMIT, log_samples=True,
                           task_manager=TaskManager(include_path=str(trained["tasks"])),
                           bootstrap_iters=0)


@pytest.fixture(scope="module")
def ours_fsdp(trained) -> dict:
    return _ours(trained, ["mesh.fsdp=8"])


def _responses(results: dict, task: str) -> list:
    return [r for sample in results["samples"][task] for r in sample["resps"]]


def _same_scores(a: dict, b: dict) -> None:
    """Accuracies exactly; perplexities to 1e-5: exponentials of float32 sums over thousands
    of tokens, where a weights' mismatched tokenizer makes a word ~20 nats (e^20 is ~5e8) and
    a relative 1e-7 in the sum is ~2e-6 in the perplexity."""
    for task, metrics in a.items():
        assert metrics.keys() == b[task].keys()
        if task == TASKS[2]:
            assert metrics == pytest.approx(b[task], rel=1e-5)
        else:
            assert metrics == b[task]


def _assert_same(a: dict, b: dict, tolerance: float) -> None:
    """The scores; each choice's log-likelihood within `tolerance`, its greedy flag equal;
    each generated text equal; each document's rolling log-likelihood within 1e-6 of it."""
    from llama_jax.harness import scores

    _same_scores(scores(a), scores(b))
    for (logprob, greedy), (their_logprob, their_greedy) in zip(
            (r[0] for r in _responses(a, TASKS[0])), (r[0] for r in _responses(b, TASKS[0])),
            strict=True):
        assert abs(logprob - their_logprob) <= tolerance
        assert greedy == their_greedy
    assert [r[0] for r in _responses(a, TASKS[1])] == [r[0] for r in _responses(b, TASKS[1])]
    rolling = [(r[0], t[0]) for r, t in zip(_responses(a, TASKS[2]), _responses(b, TASKS[2]),
                                            strict=True)]
    assert len(rolling) == 4 and all(x == pytest.approx(y, rel=1e-6) for x, y in rolling)
    assert len(_responses(a, TASKS[0])) == 4 * LIMIT


def test_scores_equal_lm_evals_own_hf_model_on_the_exported_weights(trained, ours_fsdp):
    theirs = _theirs(trained, trained["hf"])
    _assert_same(ours_fsdp, theirs, 1e-4)
    # the texts were generated, not empty: the comparison compared something
    assert all(r[0] for r in _responses(theirs, TASKS[1]))


# Llama 3's framing (BOS first) is the sentencepiece export's, compared above, and its ids are
# compared with transformers' in test_hf_tokenizer.py: its run is left to `make test-all`.
@pytest.mark.parametrize("begins_with_bos", [pytest.param(True, marks=pytest.mark.slow), False],
                         ids=["llama3", "neox"])
def test_an_hf_folder_with_a_tokenizer_json_scores_as_lm_evals_own_hf_model(
        trained, tmp_path, begins_with_bos):
    """Llama 3 and Pythia folders ship HF tokenizers' tokenizer.json alone. The exported
    weights with each kind in place of the sentencepiece model, read in place: our scores are
    lm-eval's own `hf` model's, BOS before each text where that tokenizer puts one."""
    hf = tmp_path / "hf"
    shutil.copytree(trained["hf"], hf)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (hf / name).unlink()
    write_hf_tokenizer(hf, begins_with_bos)
    theirs = _theirs(trained, hf)
    _assert_same(_ours(trained, ["mesh.fsdp=8"], hf), theirs, 1e-4)
    assert all(r[0] for r in _responses(theirs, TASKS[1]))


def test_the_same_scores_on_another_mesh_layout(trained, ours_fsdp):
    _assert_same(_ours(trained, ["mesh.data=4", "mesh.tensor=2"]), ours_fsdp, 1e-4)


def test_the_cli_prints_lm_evals_table_and_json_for_a_run_and_its_hf_export(trained,
                                                                           ours_fsdp):
    from llama_jax.harness import scores

    args = ["--tasks", ",".join(TASKS), "--limit", str(LIMIT), "--include-path",
            str(trained["tasks"]), "--batch-size", "4"]
    as_json = run_cli("lm-eval", str(trained["run"]), *args, "--json")
    assert as_json.returncode == 0, as_json.stderr
    printed = json.loads(as_json.stdout.strip().splitlines()[-1])
    _same_scores(printed, scores(ours_fsdp))
    from_hf = run_cli("lm-eval", str(trained["hf"]), *args)  # converted on the fly
    assert from_hf.returncode == 0, from_hf.stderr
    assert "|next_words_choice|" in from_hf.stdout.replace(" ", "")
    assert f"{printed['next_words_choice']['acc']:.4f}" in from_hf.stdout


def test_two_processes_score_an_hf_folder_as_one(trained, ours_fsdp):
    """lm-eval as a multi-host job (2 local processes x 4 devices) on the HF export, read in
    place: the scores of one process, for every kind of request. It failed twice over: each
    process converted the folder into its own temporary path (Orbax refuses a multi-process
    save to different paths), and the scores and generated tokens, sharded over both
    processes' devices, could not be read by either."""
    from llama_jax.harness import scores

    done = run_cli("launch", "--processes", "2", "--devices-per-process", "4", "--", "lm-eval",
                   str(trained["hf"]), "--tasks", ",".join(TASKS), "--limit", str(LIMIT),
                   "--include-path", str(trained["tasks"]), "--batch-size", "8", "--json")
    assert done.returncode == 0, done.stderr
    _same_scores(json.loads(done.stdout.strip().splitlines()[-1]), scores(ours_fsdp))


def test_tasks_run_in_the_training_loop_at_the_configured_steps(trained, tmp_path):
    done = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}",
                   "data.dataset=python_docs", "train.steps=4", "train.eval_every=0",
                   f"train.eval_tasks=[{TASKS[0]}]", "train.eval_tasks_every=3",
                   "train.eval_tasks_limit=4",
                   f"train.eval_tasks_include_path={trained['tasks']}")
    assert done.returncode == 0, done.stderr
    rows = [r for r in metrics_rows(tmp_path) if "lm_eval" in r]
    assert [r["step"] for r in rows] == [3, 4]
    assert all(set(r["lm_eval"]) == {f"{TASKS[0]}/acc", f"{TASKS[0]}/acc_norm"} and
               0 <= r["lm_eval"][f"{TASKS[0]}/acc"] <= 1 for r in rows)
    assert f"step 3: lm-eval {TASKS[0]}/acc" in done.stdout


def test_refusals_are_one_line(trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in (
            (["--tasks", "no_such_task_anywhere"], "unknown task 'no_such_task_anywhere'"),
            (["--tasks", "x", "--include-path", "/no/such/folder"],
             "--include-path /no/such/folder: no such folder"),
            (["--tasks", "x", "--include-path", str(empty)],
             f"--include-path {empty}: holds no task definitions")):
        done = run_cli("lm-eval", str(trained["run"]), *args)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr
        assert message in done.stderr.strip().splitlines()[-1]


def test_a_missing_extra_is_one_line(trained, tmp_path):
    """lm_eval made unimportable (a package of that name that raises as a missing one)."""
    shadow = tmp_path / "lm_eval"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'lm_eval'\", name='lm_eval')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for args in (["lm-eval", str(trained["run"]), "--tasks", TASKS[0]],
                 ["train", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}",
                  "data.dataset=python_docs", f"train.eval_tasks=[{TASKS[0]}]"]):
        done = subprocess.run([sys.executable, "-m", "llama_jax.cli", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr
        assert "pip install 'llama_jax[eval]'" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_documented_python_docs_task_builds_and_runs(trained, tmp_path):
    """docs/evaluation.md's two commands: the script writes the task, lm-eval runs it."""
    built = subprocess.run([sys.executable, "scripts/python_docs_tasks.py", str(tmp_path),
                            "--documents", "40"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    questions = [json.loads(line) for line in
                 (tmp_path / "python_docs_next_sentence.jsonl").read_text().splitlines()]
    assert len(questions) > 20
    assert all(len(q["choices"]) == 4 and q["context"] not in q["choices"] for q in questions)
    done = run_cli("lm-eval", str(trained["run"]), "--tasks", "python_docs_next_sentence",
                   "--include-path", str(tmp_path), "--limit", "8", "--json")
    assert done.returncode == 0, done.stderr
    acc = json.loads(done.stdout.strip().splitlines()[-1])["python_docs_next_sentence"]["acc"]
    assert acc in {i / 8 for i in range(9)}
