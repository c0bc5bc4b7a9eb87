"""`porter` command line: the parser and the dispatch to one module per command group
(`convert.py`: convert, plan, inspect, example; `queue.py`: the queued jobs; `schedule.py`).
The options of each job kind come from the kind (`tasks.kinds`).

Nothing here imports torch, numba, Celery or megatron-core: the command that needs them imports
them (`porter --help`, `status` and `jobs` start in a fraction of a second; tests/test_cli_imports.py).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator, Sequence

from converters.errors import ConversionError
from tasks.cli import convert, queue, schedule, verify
from tasks.kinds import all_kinds


class _ExampleFamilies:
    """`porter example megatron --family` choices, read from the example writer's module (which
    imports torch and megatron-core) only when argparse checks a given value or lists them."""

    @staticmethod
    def _names() -> list[str]:
        from converters.megatron.example import FAMILIES

        return sorted(FAMILIES)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def _redis_error() -> type[BaseException]:
    """redis.RedisError if a command loaded redis (else nothing it raised can be one)."""
    loaded = sys.modules.get("redis")
    return loaded.RedisError if loaded is not None else _NoRedisError


class _NoRedisError(Exception):
    """Never raised: stands for redis.RedisError while redis is not imported."""


def build_parser() -> argparse.ArgumentParser:
    """The `porter` argument parser, with every registered job kind's options."""
    parser = argparse.ArgumentParser(
        prog="porter", description="Move trained LLM checkpoints to where they are served."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    kinds = all_kinds().values()
    convert_kinds = commands.add_parser(
        "convert", help="convert a checkpoint on this machine (no servers)"
    ).add_subparsers(dest="kind", required=True)
    for kind in kinds:
        sub = convert_kinds.add_parser(kind.name, help=kind.cli.help)
        kind.cli.add_arguments(sub, "convert")
        if kind.cli.convert is None:  # run by the local executor
            sub.add_argument(
                "--workers",
                type=int,
                help="processes in parallel (default: what fits RAM and cores)",
            )
            sub.add_argument("--quiet", action="store_true", help="no progress bar")

    inspect = commands.add_parser(
        "inspect", help="print what a PowerInfer GPU index puts on the GPU"
    )
    inspect.add_argument("file", help="a .gpuidx file (PWRI)")
    inspect.add_argument(
        "--activations",
        help="activation directory, to show the share of activation mass on the GPU",
    )

    plan_kinds = commands.add_parser(
        "plan", help="show what a conversion will read, write and hold, per rank"
    ).add_subparsers(dest="kind", required=True)
    for kind in kinds:
        if kind.cli.print_plan is not None:
            kind.cli.add_arguments(plan_kinds.add_parser(kind.name, help=kind.cli.help), "plan")

    verify.add_command(commands)
    queue.add_commands(commands, kinds)
    schedule.add_commands(commands)

    example = commands.add_parser("example", help="write a small real checkpoint to try Porter on")
    example_kinds = example.add_subparsers(dest="kind", required=True)
    example_megatron = example_kinds.add_parser(
        "megatron", help="a tiny Megatron-LM checkpoint written by megatron-core"
    )
    example_megatron.add_argument("output", help="checkpoint root to create")
    example_megatron.add_argument(
        "--family",
        choices=_ExampleFamilies(),
        metavar="FAMILY",
        default="llama",
        help="llama, gpt, llama31 (rope scaling), qwen2 (QKV bias), qwen3 (qk-norm)",
    )
    example_megatron.add_argument(
        "--tp", type=int, default=2, help="training tensor-parallel size (default 2)"
    )
    example_megatron.add_argument(
        "--pp", type=int, default=1, help="training pipeline-parallel size (default 1)"
    )
    example_megatron.add_argument("--format", choices=["legacy", "torch_dist"], default="legacy")
    example_megatron.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint already at OUTPUT"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `porter` console script; returns the exit status."""
    try:
        return _run(argv)
    finally:
        if argv is None:  # the process is `porter` (console script, `python -m tasks.cli`)
            _exit_without_collecting()


def _exit_without_collecting() -> None:
    """Spare the interpreter's shutdown its garbage collection over every object still alive
    (≈30 ms of `porter status`/`jobs`' ≈0.2 s on an idle machine, most of it the redis client's
    modules): `gc.freeze()` puts them out of the collector's reach. Only when `main` runs as the
    program, which exits next; a caller that goes on (tests pass `argv`) keeps its collector.
    What runs at exit is unchanged (atexit handlers, module teardown, objects freed by
    reference count); only cyclic garbage left at exit is not finalized, which CPython never
    promises at exit anyway, and the OS closes what it held."""
    import gc

    gc.freeze()


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "convert": convert.convert,
        "plan": convert.plan,
        "example": convert.example,
        "inspect": convert.inspect,
        "verify": verify.verify,
        "submit": queue.submit,
        "status": queue.status,
        "jobs": queue.jobs,
        "cancel": queue.cancel,
        "retry": queue.retry,
        "worker": queue.worker,
        "serve": queue.serve,
        "schedule": schedule.schedule,
        "beat": schedule.beat,
    }
    try:
        return handlers[args.command](args)
    except ConversionError as exc:
        print(f"porter: error: {exc}", file=sys.stderr)
        return 1
    except _redis_error() as exc:
        if os.environ.get("PORTER_DEBUG"):
            raise
        from config.settings import Settings

        url = re.sub(r"//[^@/]*@", "//***@", Settings.from_env().redis_url)  # no password
        print(f"porter: error: Redis at {url} (PORTER_REDIS_URL): {exc}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, ValueError) as exc:
        if os.environ.get("PORTER_DEBUG"):
            raise
        where = getattr(exc, "filename", None)
        text = f"{where}: {exc}" if where and str(where) not in str(exc) else str(exc)
        print(f"porter: error: {text}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("porter: interrupted; nothing was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
