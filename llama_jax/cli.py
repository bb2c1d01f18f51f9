"""`llama-jax <command> CONFIG [a.b=value ...]`: the command-line entry point.

Each subcommand is a thin adapter over a module that does the work; user errors surface as one
line on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llama_jax.children import end_with_parent
from llama_jax.errors import LlamaJaxError, brief, check_can_write, os_error_line

STARTED = time.time()  # this session's start, for goodput (before the heavy imports)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML file, or a preset by name (tiny, llama3-8b, ...)")
    p.add_argument("overrides", nargs="*", help="a.b=value settings applied after the file")


def _load(args: argparse.Namespace):  # noqa: ANN202 - Config, imported lazily
    from llama_jax import distributed
    from llama_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    distributed.initialize(cfg.distributed)
    return cfg


def _join_from_environment() -> None:
    from llama_jax import distributed
    from llama_jax.config import DistributedConfig

    distributed.initialize(DistributedConfig())


def cmd_info(args: argparse.Namespace) -> int:
    from llama_jax import flops

    cfg = _load(args)
    counts = flops.count_params(cfg.model)
    mem = flops.state_bytes(cfg)
    fpt = flops.flops_per_token(cfg.model, cfg.data.seq_len)
    info = {
        "params": counts.total,
        "non_embedding_params": counts.non_embedding,
        "flops_per_token": fpt,
        "seq_len": cfg.data.seq_len,
        "param_bytes": mem["params"],
        "optimizer_bytes": mem["optimizer"],
        "state_bytes": mem["total"],
    }
    if args.json:
        print(json.dumps(info))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.config}", show_header=False)
    table.add_row("parameters", f"{counts.total:,}")
    table.add_row("non-embedding parameters", f"{counts.non_embedding:,}")
    table.add_row(f"training FLOPs / token (seq {cfg.data.seq_len})", f"{fpt:.4g}")
    table.add_row("parameter bytes", f"{mem['params'] / 2**30:.3f} GiB")
    table.add_row("optimizer-state bytes", f"{mem['optimizer'] / 2**30:.3f} GiB")
    table.add_row("parameters + optimizer state", f"{mem['total'] / 2**30:.3f} GiB")
    Console().print(table)
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from llama_jax.data.feed import prepare

    cfg = _load(args)
    data = prepare(cfg)
    if data is None:
        print("data.dataset=synthetic: nothing to prepare")
        return 0
    if data.tokenizer is not None:
        from llama_jax.data.pipeline import tokenize_once

        start = time.perf_counter()
        built = tokenize_once(cfg, data)
        seconds = time.perf_counter() - start
        for name, counts in built:
            print(f"source {name}: token ids written for {counts['built']} file(s), "
                  f"{counts['done_before']} already done")
        tokenized = sum(counts["bytes"] for _, counts in built) / 1e6
        if tokenized:
            print(f"tokenized {tokenized:,.1f} MB of text in {seconds:.1f} s "
                  f"({tokenized / seconds:,.1f} MB/s, data.num_workers={cfg.data.num_workers})")
        data = prepare(cfg)
    for src in data.sources:
        kind = "text" if src.text_key is not None else "token ids"
        estimated = "~" if src.files else ""  # text: estimated from a sample
        print(f"source {src.name} ({kind}, {src.weight:.0%} of the tokens): "
              f"{len(src.splits['train']):,} train / {len(src.splits['validation']):,} "
              f"validation documents, {estimated}{src.stats['train']['tokens']:,.0f} train "
              f"tokens")
    if data.tokenizer is None:
        return 0
    print(f"tokenizer {data.tokenizer.path}: {data.tokenizer.vocab_size:,} pieces, "
          f"{data.bytes_per_token['train']:.2f} bytes per token")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import jax

    from llama_jax.data.feed import source_kind
    from llama_jax.train import train

    cfg = _load(args)
    result = train(cfg, started=STARTED)
    if jax.process_index() == 0 and result.evals:
        first, last = _run_first_evaluation(cfg.run_dir, result.evals[0]), result.evals[-1]
        print(f"\nrun directory: {cfg.run_dir}")
        # Training validates on train.eval_batches batches; `eval` on the whole split (real
        # data): the token counts say which number is which.
        kind = source_kind(cfg)
        whole = "" if not kind.text else (
            "; `llama-jax eval` covers the whole validation split")
        print(f"validation loss: {first['loss']:.4f} at step {first['step']} -> "
              f"{last['loss']:.4f} at step {last['step']} (over {last['tokens']:,.0f} tokens, "
              f"train.eval_batches={cfg.train.eval_batches}{whole})")
        print("evaluate:  llama-jax eval " + cfg.run_dir)
        has_tokenizer = (kind.text and not kind.pretokenized) or cfg.data.tokenizer
        prompt = "--prompt 'The'" if has_tokenizer else "--prompt-ids 1,2,3"
        print(f"sample:    llama-jax generate {cfg.run_dir} {prompt}")
    return 0


def _run_first_evaluation(run_dir: str, session_first: dict[str, Any]) -> dict[str, Any]:
    """The run's first validation row: a resumed session validates only from its own steps
    on, and the line that closes `train` sets the run's start against its end."""
    from llama_jax.storage import as_path, json_rows

    earlier = [row for row in json_rows(as_path(run_dir) / "metrics.jsonl")
               if "perplexity" in row and "kind" not in row
               and row.get("step", session_first["step"]) < session_first["step"]]
    return earlier[0] if earlier else session_first


def cmd_goodput(args: argparse.Namespace) -> int:
    from llama_jax import goodput
    from llama_jax.storage import as_path

    run_dir = as_path(args.run_dir)
    summary = goodput.report(run_dir)
    if args.json:
        print(json.dumps(summary))
        return 0
    from rich.console import Console

    console = Console()
    console.print(goodput.table(summary, f"goodput of {run_dir}"))
    console.print(goodput.headline(summary), highlight=False, soft_wrap=True)
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from llama_jax import kernel_profile

    summary = kernel_profile.summarize(args.path, steps=args.steps, module=args.module or None)
    print(json.dumps(summary.figures(args.top)) if args.json else summary.text(args.top), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from llama_jax.evaluate import evaluate_checkpoint

    _join_from_environment()
    result = evaluate_checkpoint(args.path, args.overrides, step=args.step, split=args.split,
                                 batches=args.batches)
    import jax

    if jax.process_index() != 0:
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        bpb = result["bits_per_byte"]
        print(f"{args.path} step {result['step']} ({args.split}): loss {result['loss']:.4f}  "
              f"perplexity {result['perplexity']:.2f}  bits/byte "
              f"{'n/a (synthetic data)' if bpb is None else f'{bpb:.4f}'}  "
              f"tokens {result['tokens']:,.0f}")
        for name, loss in (result.get("loss_by_source") or {}).items():
            shown = "n/a (no tokens)" if loss is None else f"{loss:.4f}"
            print(f"  source {name}: loss {shown}  tokens "
                  f"{result['tokens_by_source'][name]:,.0f}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from llama_jax import api
    from llama_jax.harness import MeshLM, evaluate_tasks, scores, table, task_manager

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise LlamaJaxError("--tasks: name at least one task (T1,T2)")
    manager = task_manager(tasks, args.include_path)  # before the model is loaded
    _join_from_environment()
    model = api.load(args.path, args.overrides, step=args.step)
    loaded = model.loaded
    lm = MeshLM(loaded.graphdef, loaded.params, loaded.setup, loaded.tokenizer,
                batch_size=args.batch_size)
    results = evaluate_tasks(lm, tasks, args.num_fewshot, args.limit, manager=manager)
    import jax

    if jax.process_index() != 0:
        return 0
    print(json.dumps(scores(results)) if args.json else table(results))
    return 0


def _token_ids(text: str) -> list[int]:
    """`--prompt-ids 1,2,3`: every comma-separated item an integer (`1,,2` is a typo, not
    `1,2`); none at all is refused later with the other empty prompts."""
    items = [t.strip() for t in text.split(",")] if text.strip() else []
    try:
        return [int(t) for t in items]
    except ValueError:
        raise LlamaJaxError(f"--prompt-ids {text!r}: expected comma-separated token ids, "
                            f"e.g. 1,2,3") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from llama_jax.evaluate import NO_TOKENIZER, load_for_inference
    from llama_jax.generate import SamplingConfig, generate_ids

    if not args.prompt and not args.prompt_ids:
        raise LlamaJaxError("give a prompt: --prompt TEXT or --prompt-ids 1,2,3")
    id_prompts = [_token_ids(p) for p in args.prompt_ids]  # before minutes of loading
    _join_from_environment()
    loaded = load_for_inference(args.path, args.overrides, step=args.step)
    vocab = loaded.cfg.model.vocab_size
    if args.top_k > vocab:
        raise LlamaJaxError(f"--top-k {args.top_k} exceeds the vocabulary ({vocab} tokens)")
    tok = loaded.tokenizer
    if args.prompt and tok is None:
        raise LlamaJaxError(f"{args.path} {NO_TOKENIZER}: give token ids with --prompt-ids "
                            f"1,2,3, or its tokenizer with data.tokenizer=PATH")
    prompts = [tok.encode(p, eos=False) for p in args.prompt] + id_prompts  # BOS: data.add_bos
    as_text = [True] * len(args.prompt) + [False] * len(id_prompts)
    prompts = [p for p in prompts for _ in range(args.num_samples)]
    as_text = [t for t in as_text for _ in range(args.num_samples)]
    eos = tok.eos_id if tok is not None else -1
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, eos)
    outputs = generate_ids(loaded.graphdef, loaded.params, prompts, sampling, seed=args.seed,
                           mesh=loaded.mesh, rules=loaded.cfg.mesh.rules)
    import jax

    if jax.process_index() != 0:
        return 0
    for i, (prompt, out, text_prompt) in enumerate(zip(prompts, outputs, as_text, strict=True)):
        print(f"--- sample {i}" if len(outputs) > 1 else "---")
        if text_prompt:
            print(tok.decode(prompt) + tok.decode([t for t in out if t != eos]))
        else:
            print(" ".join(str(t) for t in prompt + out))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.topology:
        from llama_jax.topology import prepare_compile_only

        prepare_compile_only(args.topology)  # before JAX starts
    from llama_jax.bench import bench_pipeline, bench_step

    cfg = _load(args)
    if args.profile and (args.compile_only or args.topology):
        raise LlamaJaxError("bench --profile traces steps as they run; it does not go with "
                            "--compile-only or --topology")
    if args.compile_only or args.topology:
        from llama_jax.bench import compile_only

        print(json.dumps(compile_only(cfg, args.topology or None)))
        return 0
    result = bench_step(cfg, steps=args.steps, profile=args.profile,
                        profile_steps=args.profile_steps)
    if args.pipeline:
        result.update(bench_pipeline(cfg) or {})
    if args.json:
        print(json.dumps(result))
        return _profile_failed(result)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"llama-jax bench {args.config}", show_header=False)
    for label, value in bench_rows(result, args.steps):
        table.add_row(label, value)
    Console().print(table)
    return _profile_failed(result)


def bench_rows(result: dict[str, Any], steps: int) -> list[tuple[str, str]]:
    """`bench`'s figures as the table's (label, value) rows."""
    rows = [
        ("device", result["device"]),
        ("compile", f"{result['compile_s']:.1f} s"),
        (f"step time (median of {steps})", f"{result['step_time_s'] * 1e3:.1f} ms "
         f"(min {result['step_time_min_s'] * 1e3:.1f}, max {result['step_time_max_s'] * 1e3:.1f})"),
        ("tokens / s", f"{result['tokens_per_sec']:,.0f}"),
        ("model FLOPs / token", f"{result['flops_per_token']:.4g}"),
        ("peak FLOP/s", f"{result['peak_flops']:.4g} ({result['peak_source']})"),
        ("MFU", f"{result['mfu']:.1%}"),
    ]
    if result.get("predicted_step_s"):  # an accelerator in the chip table
        roof = result["predicted_step_s"]
        rows.append(("roofline step (this program at the chip's peaks)",
                     f"{roof * 1e3:.1f} ms; the measured step reached "
                     f"{roof / result['step_time_s']:.0%} of its speed"))
    for key, label in (("device_peak_gib", "device peak memory"),
                       ("compiled_per_device_gib", "compiled memory per device"),
                       ("host_peak_rss_gib", "host peak RSS")):
        if key in result:
            rows.append((label, f"{result[key]:.2f} GiB"))
    if "pipeline_tokens_per_sec" in result:
        rows.append((f"input pipeline tokens / s (reads {result['pipeline_reads']})",
                     f"{result['pipeline_tokens_per_sec']:,.0f}"))
    if "pipeline_text_tokens_per_sec" in result:
        rows.append(("  from text, tokenized on the fly",
                     f"{result['pipeline_text_tokens_per_sec']:,.0f}"))
        cache = result["pipeline_cache_tokens_per_sec"]
        rows.append(("  from the token cache", "not written (run prepare-data)" if cache is None
                     else f"{cache:,.0f}"))
    if "kernel_ms_per_step" in result:
        rows.append((f"kernel time per traced step ({result['profile_trace']})",
                     f"{result['kernel_ms_per_step']:.1f} ms, {result['kernels_per_step']} "
                     f"launches"))
        rows += [(f"  {kind}", f"{ms:.1f} ms") for kind, ms in
                 sorted(result["kernel_ms_by_kind"].items(), key=lambda kv: -kv[1])]
    return rows


def _profile_failed(result: dict[str, Any]) -> int:
    """The timings stand when the trace could not be read; that failure is said last."""
    if "profile_error" not in result:
        return 0
    print(f"llama-jax bench: error: --profile: {result['profile_error']}", file=sys.stderr)
    return 1


def cmd_convert(args: argparse.Namespace) -> int:
    from llama_jax import convert

    if args.direction == "neox-config":  # NEOX.yml [MORE.yml ...] OUT.yaml
        from llama_jax import flops
        from llama_jax.neox_config import convert_neox_config

        *neox_files, out_file = [args.src, args.dst, *args.overrides]
        cfg = convert_neox_config(neox_files, out_file, args.vocab_size)
        print(f"wrote {out_file} ({flops.count_params(cfg.model).total:,} parameters); "
              f"train it with: llama-jax train {out_file}")
        return 0
    if args.direction == "hf-to-orbax":
        out = convert.hf_to_orbax(args.src, args.dst, args.overrides)
    else:
        out = convert.orbax_to_hf(args.src, args.dst, step=args.step)
    print(f"wrote {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from llama_jax import sweep

    opts = sweep.SweepOptions(
        config=args.config, overrides=args.overrides, devices=args.devices,
        axes=sweep.parse_axes(args.axes), layouts=args.layouts, steps=args.steps,
        compile_only=args.compile_only, topology=args.topology, out=args.out,
        timeout_s=args.timeout)
    reporting = sweep.is_reporting_process()

    def progress(index: int, total: int, label: str) -> None:
        if reporting:
            print(f"[{index + 1}/{total}] {label}", file=sys.stderr, flush=True)

    out = Path(args.out or f"sweeps/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if reporting:
        check_can_write(out, f"--out {out}")
    result = sweep.run_sweep(opts, progress)
    if not reporting:
        return 0
    sweep.print_table(result)
    for path in sweep.write_outputs(result, out):
        print(f"wrote {path}")
    if result["interrupted"]:
        done = sum(r["status"] in ("ok", "failed") for r in result["rows"])
        print(f"llama-jax sweep: interrupted after {done} layout(s); they are in the table "
              f"and {out}", file=sys.stderr)
        return 130
    if not any(r["status"] == "ok" for r in result["rows"]):
        print(f"llama-jax sweep: error: no layout ran (the reasons are in the table and "
              f"{out})", file=sys.stderr)
        return 1
    return 0  # some layouts ran: which ones fail is a finding, not an error


def cmd_plan(args: argparse.Namespace) -> int:
    from llama_jax import plan

    def numbers(text: str, what: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise LlamaJaxError(f"{what} {text!r}: expected positive integers, e.g. 4096,8192")
        return values

    opts = plan.PlanOptions(
        config=args.config, overrides=args.overrides, topology=args.topology,
        devices=args.devices, tokens_per_step=args.tokens_per_step,
        seq_lens=numbers(args.seq_lens, "--seq-lens") if args.seq_lens else [],
        remats=tuple(r.strip() for r in args.remat.split(",") if r.strip()),
        budget_minutes=args.budget_minutes, jobs=args.jobs, measure=args.measure,
        steps=args.steps, out=args.out)
    out = Path(args.out or f"plans/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_can_write(out, f"--out {out}")
    result = plan.run_plan(opts, lambda line: print(line, file=sys.stderr, flush=True))
    plan.print_table(result)
    for path in plan.write_outputs(result, out, opts):
        print(f"wrote {path}")
    if result["interrupted"]:
        print(f"llama-jax plan: interrupted; what was compiled and measured by then is in the "
              f"table and {out}", file=sys.stderr)
        return 130
    if not result["best_overrides"]:
        print(f"llama-jax plan: error: no candidate compiled and fit (the reasons are in the "
              f"table and {out / 'plan.csv'})", file=sys.stderr)
        return 1
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "info": (cmd_info, "parameter count, FLOPs per token and state memory of a config"),
    "prepare-data": (cmd_prepare_data, "build the dataset and train or load the tokenizer"),
    "train": (cmd_train, "train (or resume) a model as the config says"),
    "eval": (cmd_eval, "loss, perplexity and bits per byte of a checkpoint on a split"),
    "generate": (cmd_generate, "sample from a checkpoint with a KV cache"),
    "lm-eval": (cmd_lm_eval, "lm-evaluation-harness tasks on a checkpoint or an HF folder, on "
                             "the mesh (needs the eval extra)"),
    "bench": (cmd_bench, "compile time, step time, tokens/s, MFU and memory of the train step"),
    "convert": (cmd_convert, "HuggingFace LLaMA / GPT-NeoX <-> llama_jax checkpoints; "
                             "GPT-NeoX YAML configs -> ours"),
    "sweep": (cmd_sweep, "compile and measure every mesh layout of the devices (or a TPU slice)"),
    "plan": (cmd_plan, "search layouts x per-device batch x remat for a model on a slice (or "
                       "N devices): pruned, compiled, ranked by a roofline, best as plan.yaml"),
    "goodput": (cmd_goodput, "where a run's wall time went, over all its restarts"),
    "kernels": (cmd_kernels, "where a profiled step's device time went, by kernel kind, from a "
                             "profiler trace (bench --profile, train.profile_steps)"),
}


def _bounded(kind: type, low: float, high: float | None = None, low_open: bool = False
             ) -> Callable[[str], Any]:
    """An argparse type: `kind` within [low, high] ((low, high] with `low_open`), refused in
    argparse's one-line usage error otherwise."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high):
            span = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high else "")
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value
    return parse


SPLITS = ("train", "validation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-jax", description=__doc__.splitlines()[0],
        epilog="llama-jax launch --processes N [--devices-per-process D] -- COMMAND ...: "
               "run N local processes of one command, joined as one multi-host job "
               "(see `llama-jax launch --help`)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == "convert":
            p.add_argument("direction", choices=("hf-to-orbax", "orbax-to-hf", "neox-config"))
            p.add_argument("src", help="HF folder, or a llama_jax run / checkpoint, or a "
                           "GPT-NeoX YAML (neox-config NEOX.yml [MORE.yml ...] OUT.yaml)")
            p.add_argument("dst", help="output folder (neox-config: the next file)")
            p.add_argument("overrides", nargs="*", help="a.b=value for the written config "
                           "(neox-config: more files, the last is the output)")
            p.add_argument("--step", type=int, default=None)
            p.add_argument("--vocab-size", type=int, default=None,
                           help="neox-config: the tokenizer's size, before NeoX's padding")
            continue
        if name == "kernels":
            p.add_argument("path", help="a trace (*.trace.json.gz) or a folder holding one "
                           "(bench --profile DIR, RUN_DIR/profile): the newest is read")
            p.add_argument("--steps", type=_bounded(int, 1), default=None,
                           help="executions the trace holds (default: counted from it)")
            p.add_argument("--module", default="",
                           help="the compiled module (default: the one with the most kernel "
                                "time)")
            p.add_argument("--top", type=_bounded(int, 0), default=30,
                           help="kernels listed by time")
            p.add_argument("--json", action="store_true", help="print one JSON object")
            continue
        if name == "goodput":
            p.add_argument("run_dir", help="a run directory")
            p.add_argument("--json", action="store_true", help="print one JSON object")
            continue
        if name in ("eval", "generate", "lm-eval"):
            p.add_argument("path", help="a run directory, one checkpoint step directory, or "
                           "an HF LLaMA / GPT-NeoX folder (read in place)")
            p.add_argument("overrides", nargs="*", help="a.b=value (e.g. a mesh layout)")
            p.add_argument("--step", type=int, default=None, help="checkpoint step (default: "
                           "the latest)")
        else:
            _config_args(p)
        if name in ("bench", "sweep"):
            per = " per layout" if name == "sweep" else " after warm-up"
            p.add_argument("--steps", type=_bounded(int, 1), default=5 if name == "sweep" else 10,
                           help="timed steps" + per)
            p.add_argument("--compile-only", action="store_true",
                           help="compile the step ahead of time from abstract inputs, run "
                                "nothing")
            p.add_argument("--topology", default="",
                           help="compile only, for a TPU slice (v5p:2x2x2, v5p-16, 2xv5p-128; "
                                "`make tpu`) or GPUs (h100, h200:8, 2xh100:8; `make "
                                "gpu-compile`)")
        if name == "bench":
            p.add_argument("--pipeline", action="store_true",
                           help="also measure the input pipeline's tokens/s")
            p.add_argument("--profile", default="",
                           help="a local folder: trace --profile-steps more steps there and "
                                "add where their kernel time went (`llama-jax kernels`)")
            p.add_argument("--profile-steps", type=_bounded(int, 1), default=2,
                           help="steps traced with --profile")
        if name == "sweep":
            p.add_argument("--devices", type=_bounded(int, 1), default=None,
                           help="device count (default: all; on CPU, simulated devices)")
            p.add_argument("--axes", default="data,fsdp,tensor",
                           help="mesh axes to factor the devices over")
            p.add_argument("--layouts", default="",
                           help='explicit layouts instead, e.g. "data=2,fsdp=4;fsdp=8"')
            p.add_argument("--out", default="", help="folder for sweep.csv/json/png "
                           "(default: sweeps/<config>-<time>)")
            p.add_argument("--timeout", type=_bounded(float, 0.0, low_open=True), default=900.0,
                           help="seconds one layout may take before it is recorded as failed")
        if name == "plan":
            where = p.add_mutually_exclusive_group(required=True)
            where.add_argument("--topology", default="",
                               help="a TPU slice (v5p:2x2x2, v5p-16) or GPUs (h100:8): "
                                    "compiled for, not run")
            where.add_argument("--devices", type=_bounded(int, 1), default=None,
                               help="this machine's devices (CPU: simulated), compiled and "
                                    "the best measured")
            p.add_argument("--tokens-per-step", type=_bounded(int, 1), default=None,
                           help="tokens per optimizer step (default: the config's batch x "
                                "sequence length)")
            p.add_argument("--seq-lens", default="", help="sequence lengths to try, L1,L2 "
                           "(default: the config's)")
            p.add_argument("--remat", default=",".join(("none", "dots_with_no_batch_dims_"
                                                         "saveable", "full")),
                           help="remat policies to try")
            p.add_argument("--budget-minutes", type=_bounded(float, 0.0, low_open=True),
                           default=15.0, help="time for compiling candidates")
            p.add_argument("--jobs", type=_bounded(int, 1), default=2,
                           help="compiles at once, each its own process")
            p.add_argument("--measure", type=_bounded(int, 0), default=3,
                           help="the best predicted candidates to run (devices only)")
            p.add_argument("--steps", type=_bounded(int, 1), default=3,
                           help="timed steps of each measured candidate")
            p.add_argument("--out", default="", help="folder for plan.json/csv/png/yaml "
                           "(default: plans/<config>-<time>)")
        if name in ("info", "eval", "bench"):
            p.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "lm-eval":
            p.add_argument("--tasks", required=True, help="task or group names, T1,T2")
            p.add_argument("--num-fewshot", type=_bounded(int, 0), default=None,
                           help="examples in each prompt (default: each task's own)")
            p.add_argument("--limit", type=_bounded(int, 1), default=None,
                           help="documents per task (default: all)")
            p.add_argument("--include-path", default="",
                           help="a folder of local task definitions (YAML + data files)")
            p.add_argument("--batch-size", type=_bounded(int, 1), default=16,
                           help="rows per forward (rounded up to the mesh's batch shards)")
            p.add_argument("--json", action="store_true",
                           help="print one JSON object {task: {metric: value}}")
        if name == "eval":
            p.add_argument("--split", default="validation", choices=SPLITS)
            p.add_argument("--batches", type=_bounded(int, 0), default=0,
                           help="batches to evaluate, at most one pass over the split "
                                "(default 0: one pass)")
        if name == "generate":
            p.add_argument("--prompt", action="append", default=[],
                           help="prompt text; repeat for a batch of prompts")
            p.add_argument("--prompt-ids", action="append", default=[],
                           help="a prompt as comma-separated token ids (runs without a "
                                "tokenizer, e.g. trained on synthetic tokens); repeatable")
            p.add_argument("--max-new-tokens", type=_bounded(int, 1), default=64)
            p.add_argument("--temperature", type=_bounded(float, 0.0), default=0.0,
                           help="0: greedy")
            p.add_argument("--top-k", type=_bounded(int, 0), default=0,
                           help="keep the k likeliest tokens (0: all); at most the vocabulary")
            p.add_argument("--top-p", type=_bounded(float, 0.0, 1.0, low_open=True),
                           default=1.0, help="nucleus mass in (0, 1] (1: all)")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--num-samples", type=_bounded(int, 1), default=1)
    return parser


def _launch(argv: list[str]) -> int:
    from llama_jax.launch import launch

    p = argparse.ArgumentParser(prog="llama-jax launch",
                                description="run N local processes of one llama-jax command")
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, default=1)
    p.add_argument("--port", type=_bounded(int, 0, 65535), default=0,
                   help="coordinator port (default: a free one)")
    p.add_argument("--log-dir", default=None,
                   help="where processes 1..N-1 write their output (default: a temporary "
                        "folder, kept only if a process fails)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS ...")
    args = p.parse_args(argv)
    for name in ("processes", "devices_per_process"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return launch(command, args.processes, args.devices_per_process, args.port, args.log_dir)


def _quiet_closed_loop_callbacks(unraisable: Any) -> None:
    """After a failed Orbax restore, tensorstore still completes the reads it had in flight and
    calls back into the event loop Orbax has already closed. That noise would turn a one-line
    error into a traceback; everything else goes to the default hook."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def main(argv: Sequence[str] | None = None) -> int:
    end_with_parent()  # when started by `launch`, `sweep` or `plan`
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.unraisablehook = _quiet_closed_loop_callbacks
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        return _launch(argv[1:])
    parser = build_parser()
    # Overrides may follow options too (`eval RUN --json mesh.fsdp=4`): argparse leaves them
    # unparsed, and we take every `a.b=value` among them as an override.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        return COMMANDS[args.command][0](args)
    except LlamaJaxError as e:
        print(f"llama-jax {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except OSError as e:  # disk full, read-only, permission denied, a vanished directory
        print(f"llama-jax {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # an object store's refusal (HTTP error, no credentials)
        from llama_jax.storage import storage_errors

        if not isinstance(e, storage_errors()):
            raise
        print(f"llama-jax {args.command}: error: storage: {type(e).__name__}: {brief(e)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"llama-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
