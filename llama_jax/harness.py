"""EleutherAI's lm-evaluation-harness on the mesh: `MeshLM`, an `lm_eval` model over a restored
llama_jax model, and `evaluate_tasks`, which runs tasks through it.

`MeshLM` builds on lm-eval's `TemplateLM`, which turns (context, continuation) pairs into
token lists the way lm-eval's own `hf` model does (trailing spaces of the context move to
the continuation; the pair is encoded whole and split at the context's length), so both
score the same tokens. Scoring is one jitted forward per batch of rows, sharded over the
mesh's batch axes, that returns per row the sum of the continuation's log-probabilities and
whether greedy decoding would have produced it: only [rows] numbers leave the devices, never
the [rows, length, vocab] logits. Rows are padded on the right (the model is causal, so
padding after a row's last token cannot change it) to a power-of-two length, so a task
compiles a handful of shapes. Generation is the KV-cache generator (`generate.py`).

lm-eval is an optional extra (`pip install 'llama_jax[eval]'`): this module imports it, and
callers import this module only when tasks are asked for (`require_lm_eval`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import sharding
from llama_jax.errors import LlamaJaxError
from llama_jax.evaluate import NO_TOKENIZER

try:
    from lm_eval import simple_evaluate
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager
except ModuleNotFoundError as e:  # pragma: no cover - the message is tested in a subprocess
    if (e.name or "").split(".")[0] != "lm_eval":
        raise
    raise LlamaJaxError("lm-eval is not installed: pip install 'llama_jax[eval]' (or "
                        "pip install lm_eval)") from None

PyTree = Any
MIN_LENGTH = 16  # the shortest padded row length


class MeshLM(TemplateLM):
    """An lm-eval `LM` over params already placed on a mesh (a restored run, or a run's live
    training state), with the run's tokenizer."""

    def __init__(self, graphdef: nnx.GraphDef, params: PyTree, setup: Any, tokenizer: Any,
                 batch_size: int = 16, max_length: int | None = None):
        super().__init__()
        if tokenizer is None:
            raise LlamaJaxError(f"lm-eval needs text, and this model {NO_TOKENIZER}: name "
                                f"its tokenizer with data.tokenizer=PATH")
        self.graphdef, self.params, self.setup, self.tokenizer = graphdef, params, setup, tokenizer
        self.mesh, self.rules = setup.mesh, setup.cfg.mesh.rules
        self.max_length = max_length or setup.cfg.model.max_position_embeddings
        rows_sharding = sharding.batch_sharding(self.mesh, self.rules)
        shards = [math.prod(self.mesh.shape[a] for a in _axes(rows_sharding.spec, dim))
                  for dim in (0, 1)]
        self.batch_rows = -(-max(batch_size, 1) // shards[0]) * shards[0]  # whole shards
        self.length_multiple = shards[1]
        self.rows_sharding = rows_sharding
        # Every process reads the scores whole: a multi-host job's processes each run
        # lm-eval's requests alike, and a row's score may sit on another host's device.
        self._score = jax.jit(self._score_rows, out_shardings=sharding.replicated(self.mesh))

    # -- what TemplateLM asks of a model ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS where the tokenizer has one, as lm-eval's
        `hf` model does."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any
                   ) -> list[int]:
        """BOS first where the model's texts begin with it (`data.add_bos`: as in training,
        as the HF tokenizer that `convert orbax-to-hf` writes does, and for an HF folder as
        its own tokenizer does), unless told otherwise."""
        return self.tokenizer.encode(
            string, bos=self.tokenizer.add_bos and add_special_tokens is not False, eos=False)

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **_: Any
                              ) -> list[tuple[float, bool]]:
        rows = []
        for _key, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        # longest first, so each batch pads to about its own length
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_rows):
            chunk = order[start:start + self.batch_rows]
            for i, result in zip(chunk, self._score_batch([rows[i] for i in chunk]), strict=True):
                results[i] = result
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """Each text's whole log-likelihood in windows of the model's length, each window's
        first prediction conditioned on BOS (lm-eval's `get_rolling_token_windows`)."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, target in map(lm_eval_utils.make_disjoint_window,
                                       lm_eval_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(text),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations, cut at the first stop string;
        contexts are cut on the left to leave room for `max_gen_toks`."""
        from llama_jax.generate import SamplingConfig, generate_ids

        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            new_tokens = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") \
                else 0.0
            sampling = SamplingConfig(new_tokens, temperature,
                                      int(kwargs.get("top_k", 0) or 0),
                                      float(kwargs.get("top_p", 1.0) or 1.0), self.eot_token_id)
            room = max(self.max_length - new_tokens, 1)
            for start in range(0, len(members), self.batch_rows):
                chunk = members[start:start + self.batch_rows]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])
                           [-room:] for i in chunk]
                continuations = generate_ids(self.graphdef, self.params, prompts, sampling,
                                             mesh=self.mesh, rules=self.rules)
                for i, ids in zip(chunk, continuations, strict=True):  # new tokens only
                    text = self.tok_decode([t for t in ids if t != self.eot_token_id])
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    # -- scoring ---------------------------------------------------------------------------

    def _score_batch(self, rows: list[tuple[list[int], list[int], int]]
                     ) -> list[tuple[float, bool]]:
        longest = max(len(r[0]) for r in rows)
        length = max(MIN_LENGTH, 1 << (longest - 1).bit_length())
        length = -(-min(length, max(self.max_length, longest)) // self.length_multiple) * \
            self.length_multiple
        inputs = np.zeros((self.batch_rows, length), np.int32)
        targets = np.zeros((self.batch_rows, length), np.int32)
        scored = np.zeros((self.batch_rows, length), np.bool_)
        for i, (row_in, row_target, count) in enumerate(rows):
            inputs[i, :len(row_in)] = row_in
            targets[i, :len(row_target)] = row_target
            # a continuation longer than the window: the part in the window
            scored[i, max(0, len(row_in) - count):len(row_in)] = True
        placed = [self._placed(a) for a in (inputs, targets, scored)]
        logprob, greedy = jax.device_get(self._score(self.params, *placed))
        return [(float(logprob[i]), bool(greedy[i])) for i in range(len(rows))]

    def _placed(self, host: np.ndarray) -> jax.Array:
        """A host array every process holds whole, as one array over the mesh."""
        return jax.make_array_from_callback(host.shape, self.rows_sharding,
                                            lambda index: host[index])

    def _score_rows(self, params: PyTree, inputs: jax.Array, targets: jax.Array,
                    scored: jax.Array) -> tuple[jax.Array, jax.Array]:
        with sharding.activation_sharding(self.mesh, self.rules):
            logits = nnx.merge(self.graphdef, params)(inputs).astype(jnp.float32)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
        greedy = jnp.argmax(logits, axis=-1) == targets
        return (jnp.sum(jnp.where(scored, picked, 0.0), axis=-1),
                jnp.all(greedy | ~scored, axis=-1))


def _axes(spec: Any, dim: int) -> tuple[str, ...]:
    """The mesh axes a PartitionSpec shards dimension `dim` over."""
    entry = spec[dim] if dim < len(spec) else None
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_include_path(path: str) -> None:
    """One line for a folder lm-eval could not use (it would otherwise ignore it silently and
    report every task in it as unknown)."""
    if not path:
        return
    folder = Path(path)
    if not folder.is_dir():
        raise LlamaJaxError(f"--include-path {path}: no such folder")
    if not any(folder.rglob("*.yaml")):
        raise LlamaJaxError(f"--include-path {path}: holds no task definitions (*.yaml)")


def task_manager(tasks: list[str], include_path: str = "") -> TaskManager:
    """lm-eval's index of tasks (its own and `include_path`'s), once every name in `tasks` is
    known to it; otherwise one line naming the first that is not."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data files only: never the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_include_path(include_path)
    manager = TaskManager(include_path=include_path or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = f" in lm-eval or {include_path}" if include_path else \
            " in lm-eval (local tasks: --include-path DIR)"
        raise LlamaJaxError(f"unknown task {unknown[0]!r}: no such task or group{hint}")
    return manager


def evaluate_tasks(lm: MeshLM, tasks: list[str], num_fewshot: int | None = None,
                   limit: int | None = None, include_path: str = "",
                   log_samples: bool = False, bootstrap_iters: int = 100_000,
                   manager: TaskManager | None = None) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` through `lm`. `bootstrap_iters=0` skips the standard
    errors that need resampling (in the loop)."""
    manager = manager or task_manager(tasks, include_path)
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                           task_manager=manager, log_samples=log_samples,
                           bootstrap_iters=bootstrap_iters)


class TaskEvaluator:
    """`train.eval_tasks` during training: on the live parameters every `eval_tasks_every`
    steps (the loop adds the last), written as `eval/` rows `{"step", "lm_eval": {"task/metric":
    value}}`. `manager` is looked up when the run starts (`task_manager`), so a wrong name
    stops it before anything is written."""

    def __init__(self, setup: Any, tokenizer: Any, writer: Any, say: Any | None,
                 manager: TaskManager):
        t = setup.cfg.train
        self.setup, self.tokenizer, self.writer, self.say = setup, tokenizer, writer, say
        self.tasks, self.every, self.limit = list(t.eval_tasks), t.eval_tasks_every, \
            t.eval_tasks_limit or None
        self.manager = manager
        self.lm: MeshLM | None = None
        self.results: list[dict[str, Any]] = []
        # the loop has its own progress line: lm-eval's warnings and bars would break it up
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        os.environ["TQDM_DISABLE"] = "1"
        import datasets

        datasets.disable_progress_bars()

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def run(self, step: int, params: PyTree) -> dict[str, Any]:
        if self.lm is None:  # one model, so its scoring programs are traced once
            self.lm = MeshLM(self.setup.graphdef, params, self.setup, self.tokenizer,
                             batch_size=self.setup.cfg.train.global_batch_size)
        self.lm.params = params
        found = scores(evaluate_tasks(self.lm, self.tasks, limit=self.limit, bootstrap_iters=0,
                                      manager=self.manager))
        row = {"step": step, "lm_eval": {f"{task}/{metric}": value
                                         for task, metrics in found.items()
                                         for metric, value in metrics.items()}}
        self.results.append(row)
        self.writer.write(row, prefix="eval")
        if self.say:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row["lm_eval"].items())
            self.say(f"step {step}: lm-eval {shown}")
        return row


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results ("acc,none" -> "acc"; a metric under
    another filter keeps its name, "exact_match,strict-match")."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, int | float) or "_stderr" in key:
                continue
            metric, filtered = key.split(",", 1)
            out.setdefault(task, {})[metric if filtered == "none" else key] = float(value)
    return out


def table(results: dict[str, Any]) -> str:
    return lm_eval_utils.make_table(results)
