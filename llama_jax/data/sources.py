"""The data sources a run can name (`data.dataset`) and what kind of rows each yields: the one
place that knows the names. Any other name is a TFDS dataset, which yields text."""

from __future__ import annotations

from dataclasses import dataclass

SYNTHETIC = "synthetic"  # learnable token progressions: no corpus, no tokenizer
PYTHON_DOCS = "python_docs"  # pydoc topics and standard-library docstrings of this Python
TEXT_FILES = "text_files"  # the user's .txt/.jsonl files (`data.files`)
MEGATRON = "megatron"  # Megatron/GPT-NeoX .bin/.idx token files (`data.paths`, `data.weights`)


@dataclass(frozen=True)
class SourceKind:
    """What a data source's rows are."""

    packed: bool  # several documents per row: segment ids keep attention inside each
    text: bool  # real data: a validation split to evaluate (and, unless pre-tokenized, a
    # tokenizer and bytes per token)
    pretokenized: bool = False  # token ids on disk: no tokenizer, no bits per byte


TEXT = SourceKind(packed=True, text=True)
# Synthetic rows hold one sequence each: no document mask, so fused attention kernels (cuDNN)
# run their plain causal path; and no text behind them.
KINDS = {SYNTHETIC: SourceKind(packed=False, text=False), PYTHON_DOCS: TEXT, TEXT_FILES: TEXT,
         MEGATRON: SourceKind(packed=True, text=True, pretokenized=True)}


def kind_of(dataset: str) -> SourceKind:
    return KINDS.get(dataset, TEXT)


def kind_of_mixture(datasets: list[str]) -> SourceKind:
    """Several sources: packed text; token ids on disk only if every source is."""
    return SourceKind(packed=True, text=True,
                      pretokenized=all(kind_of(d).pretokenized for d in datasets))
