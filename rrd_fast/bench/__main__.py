"""`python -m rrd_fast.bench SUBCOMMAND [args]` (the subcommands are listed in the package docstring)."""

from __future__ import annotations

import sys

from rrd_fast.bench.common import tune_malloc_for

if __name__ == "__main__":
    tune_malloc_for(sys.argv[1:])  # before torch loads: the re-executed process pays for the imports

import argparse  # noqa: E402

from rrd_fast.bench import cache, cache_dtype, compiled, memory, methods, pipelines, reliability, threads, train  # noqa: E402
from rrd_fast.cli import run_cli  # noqa: E402

COMMANDS = {"train": train, "compile": compiled, "methods": methods, "memory": memory, "cache": cache, "pipelines": pipelines, "threads": threads,
            "cache-dtype": cache_dtype, "reliability": reliability}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rrd_fast.bench", description="Benchmarks of rrd-fast.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=module.HELP, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(command)
        command.set_defaults(run=module.command)
    # Started by `train` in fresh processes to compare start-up settings; not listed in the help.
    probe = sub.add_parser("probe", description="one process's student-step speed, as JSON (internal to train)")
    train.add_probe_arguments(probe)
    probe.set_defaults(run=train.probe_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
