"""`llama-jax <command> CONFIG [a.b=value ...]`: the command-line entry point.

Each subcommand is a thin adapter over a module that does the work; user errors surface as one
line on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from llama_jax.errors import LlamaJaxError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (a preset in configs/ or your own)")
    p.add_argument("overrides", nargs="*", help="a.b=value settings applied after the file")


def _load(args: argparse.Namespace):  # noqa: ANN202 - Config, imported lazily
    from llama_jax.config import load_config

    return load_config(args.config, args.overrides)


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


def cmd_train(args: argparse.Namespace) -> int:
    from llama_jax.train import train

    train(_load(args))
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "info": (cmd_info, "parameter count, FLOPs per token and state memory of a config"),
    "train": (cmd_train, "train (or resume) a model as the config says"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        _config_args(p)
        if name == "info":
            p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][0](args)
    except LlamaJaxError as e:
        print(f"llama-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
