"""A local lm-eval task from the python_docs corpus, for `llama-jax lm-eval --include-path`.

`python_docs_next_sentence`: a sentence of the Python documentation as the context; the
choices are the sentence that follows it and three sentences from other documents. A model
that has learned the docs' style and topics ranks the true one higher (chance: 25%).

    python scripts/python_docs_tasks.py tasks/python_docs
    llama-jax lm-eval runs/default --tasks python_docs_next_sentence \
        --include-path tasks/python_docs --limit 200

The corpus is the one `data.dataset=python_docs` builds from this Python's own
documentation (nothing is downloaded); the documents are the validation end of it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_jax.data.corpus import write_python_docs  # noqa: E402
from llama_jax.errors import script_main  # noqa: E402

TASK = "python_docs_next_sentence"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences_by_document(corpus: Path) -> list[list[str]]:
    """Each document's sentences of 6 to 40 words, whitespace made single spaces."""
    out = []
    for line in corpus.read_text().splitlines():
        text = " ".join(json.loads(line)["text"].split())
        kept = [s for s in SENTENCE_END.split(text) if 6 <= len(s.split()) <= 40]
        if len(kept) >= 2:
            out.append(kept)
    return out


def build(out: Path, cache_dir: Path, documents: int, seed: int) -> Path:
    corpus = write_python_docs(cache_dir / "corpus")
    docs = sentences_by_document(corpus)[-documents:]  # the end of the corpus
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{TASK}.jsonl"
    with open(data, "w") as f:
        for d, sentences in enumerate(docs):
            i = rng.randrange(len(sentences) - 1)
            others = [rng.choice(docs[(d + rng.randrange(1, len(docs))) % len(docs)])
                      for _ in range(3)]
            label = rng.randrange(4)
            choices = others[:label] + [sentences[i + 1]] + others[label:]
            f.write(json.dumps({"context": sentences[i], "choices": choices,
                                "label": label}) + "\n")
    (out / f"{TASK}.yaml").write_text(multiple_choice_yaml(TASK, data))
    return data


def multiple_choice_yaml(task: str, data: Path) -> str:
    """An lm-eval multiple-choice task over JSON lines {"context", "choices", "label"}."""
    return f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data.resolve()}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
target_delimiter: " "
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the folder to write the task into (YAML + JSON lines)")
    p.add_argument("--cache-dir", default=str(ROOT / "data_cache"),
                   help="where the python_docs corpus is (or is built): data.cache_dir")
    p.add_argument("--documents", type=int, default=500, help="questions, one per document")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data = build(Path(args.out), Path(args.cache_dir), args.documents, args.seed)
    print(f"wrote {sum(1 for _ in open(data))} questions to {data} and {TASK}.yaml beside it")


if __name__ == "__main__":
    script_main("python_docs_tasks", main)
