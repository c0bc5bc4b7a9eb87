"""Engine builds: one TensorRT-LLM engine per rank, on workers of the `gpu` queue.

`build_engine_step` fetches `config.json` and `rank{N}.safetensors` of a finished conversion into
a local scratch directory, runs the builder command in a child process (CUDA is never initialised
in the worker process itself) and uploads what it wrote under `engines/`.

The builder command (env `PORTER_TRTLLM_BUILD`, split like a shell line) receives `trtllm-build`'s
own arguments plus `--rank N`. `trtllm-build` itself builds every rank of the checkpoint's mapping
(`tensorrt_llm.commands.build.parallel_build` loops over `range(world_size)`), so the default
command is this module run as a program: it calls TensorRT-LLM's `trtllm-build` entry point with
its `parallel_build` narrowed to the one rank (TensorRT-LLM's own `build_and_save`). See
docs/ENGINES.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from converters.errors import ConversionError
from tasks.storage.base import Artifact, ArtifactStore, sha256_file
from tasks.storage.store import open_store

log = logging.getLogger(__name__)

ENV_COMMAND = "PORTER_TRTLLM_BUILD"
ENGINES = "engines"
CONFIG = "config.json"
TAIL_LINES = 20
_TAIL_BYTES = 64 * 1024
_OPTION_NAME = re.compile(r"[a-z][a-z0-9_]*")
_RANK_FILE = re.compile(r"rank(\d+)(?=[._])")
# Options Porter sets itself, or that name paths on the worker or change which ranks are built.
RESERVED_OPTIONS = frozenset(
    {
        "rank",
        "checkpoint_dir",
        "output_dir",
        "model_config",
        "build_config",
        "model_cls_file",
        "model_cls_name",
        "workers",
        "auto_parallel",
        "lora_dir",
        "visualize_network",
        "input_timing_cache",
        "output_timing_cache",
    }
)


# --------------------------------------------------------------------------------------------
# Which command builds, and can this machine run it


def builder_command() -> list[str]:
    """The builder command: `PORTER_TRTLLM_BUILD` split like a shell line, else this module."""
    raw = os.environ.get(ENV_COMMAND, "").strip()
    if not raw:
        return [sys.executable, "-m", __name__]
    return shlex.split(raw)


def _is_default(command: list[str]) -> bool:
    return command == [sys.executable, "-m", __name__]


def engine_builder_problem() -> str | None:
    """None if this machine can build engines, else a one-line reason.

    Checks the builder command (TensorRT-LLM importable for the default one, else the command on
    PATH) and that a GPU is visible, without initialising CUDA. `porter worker --queues gpu`
    refuses to start on a reason.
    """
    try:
        command = builder_command()
    except ValueError as exc:
        return f"{ENV_COMMAND} is not a valid command line: {exc}"
    return _command_problem(command) or _gpu_problem()


def _command_problem(command: list[str]) -> str | None:
    """Why `command` cannot run here (without importing TensorRT-LLM), or None."""
    if _is_default(command):
        return _trtllm_problem()
    if not command:
        return f"{ENV_COMMAND} names no command"
    if shutil.which(command[0]) is None:
        return f"engine builder command {command[0]!r} ({ENV_COMMAND}) is not an executable on PATH"
    return None


def _trtllm_problem() -> str | None:
    """Whether `tensorrt_llm.commands.build` exists, found without importing the package."""
    spec = importlib.util.find_spec("tensorrt_llm")
    if spec is None:
        return (
            f"TensorRT-LLM is not installed in {sys.executable} "
            f"(install tensorrt_llm, or set {ENV_COMMAND})"
        )
    locations = spec.submodule_search_locations or []
    if not any((Path(loc) / "commands" / "build.py").is_file() for loc in locations):
        return "this TensorRT-LLM has no tensorrt_llm/commands/build.py (trtllm-build)"
    return None


def _gpu_problem() -> str | None:
    """Why no NVIDIA GPU is visible to a child process, or None. Never initialises CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return f"no GPU visible: CUDA_VISIBLE_DEVICES={visible!r}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        if any(Path("/dev").glob("nvidia[0-9]*")):
            return None
        return "no NVIDIA GPU found (no nvidia-smi on PATH and no /dev/nvidia* device)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi -L failed: {exc}"
    if out.returncode != 0 or "GPU" not in out.stdout:
        detail = (out.stderr or out.stdout).strip().splitlines()
        return f"nvidia-smi -L lists no GPU ({detail[-1] if detail else f'exit {out.returncode}'})"
    return None


# --------------------------------------------------------------------------------------------
# Options → trtllm-build arguments


def option_args(options: dict[str, Any] | None) -> list[str]:
    """`{"max_batch_size": 8, "strip_plan": True}` → `["--max_batch_size=8", "--strip_plan"]`.

    True is a bare flag, False/None leave the option out, a list gives one token per item.
    """
    args: list[str] = []
    for name, value in sorted((options or {}).items()):
        _check_option(name, value)
        if value is None or value is False:
            continue
        if value is True:
            args.append(f"--{name}")
        elif isinstance(value, list | tuple):
            args += [f"--{name}", *(_scalar(name, v, alone=True) for v in value)]
        else:
            args.append(f"--{name}={_scalar(name, value, alone=False)}")
    return args


def _check_option(name: str, value: Any) -> None:
    if not isinstance(name, str) or not _OPTION_NAME.fullmatch(name):
        raise ConversionError(f"engine build option {name!r} is not a trtllm-build option name")
    if name in RESERVED_OPTIONS:
        raise ConversionError(f"engine build option {name!r} is set by Porter or not allowed")
    if isinstance(value, list | tuple) and not value:
        raise ConversionError(f"engine build option {name!r} has an empty list")


def _scalar(name: str, value: Any, *, alone: bool) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConversionError(f"engine build option {name!r} has an unsupported value {value!r}")
    text = str(value)
    if alone and text.startswith("-"):
        raise ConversionError(f"engine build option {name!r}: list item {text!r} starts with '-'")
    return text


# --------------------------------------------------------------------------------------------
# The step


def build_engine_step(
    output_uri: str,
    job: str,
    rank: int,
    world_size: int,
    tag: str,
    options: dict | None = None,
) -> dict:
    """Build rank `rank`'s engine from the TensorRT-LLM checkpoint at `output_uri`.

    Fetches config.json and rank{rank}.safetensors into local scratch, runs the builder, uploads
    `engines/rank{rank}.engine` (and, from rank 0, `engines/config.json`) with `tag`, and returns
    {"rank", "files": [{"file": key, "bytes_written", "sha256"}], "seconds", "reused"}.
    Idempotent: an engine already stored with this tag and a sha256 is returned without a build.
    Errors raise ConversionError naming the file or command (with the builder's stderr tail).
    """
    start = time.monotonic()
    if not 0 <= rank < world_size:
        raise ConversionError(f"rank {rank} is outside world size {world_size}", output_uri)
    extra_args = option_args(options)
    store = open_store(output_uri)
    done = committed_engine(store, rank, tag)
    if done is not None:
        log.info("rank %d engine already built with tag %s; reusing it", rank, tag)
        return _result(rank, done, start, reused=True)
    with _workdir(job, rank) as work:
        ckpt = _fetch_checkpoint(store, rank, world_size, work / "checkpoint")
        out = work / "engine"
        out.mkdir()
        _run_builder(rank, ckpt, out, extra_args, work)
        files = _upload(store, out, rank, tag)
    return _result(rank, files, start, reused=False)


def engine_key(rank: int) -> str:
    """The key of rank `rank`'s engine; it is uploaded last, so it marks a finished rank."""
    return f"{ENGINES}/rank{rank}.engine"


def committed_engine(store: ArtifactStore, rank: int, tag: str) -> list[Artifact] | None:
    """Rank `rank`'s uploaded engine files if its engine exists with this tag and a sha256."""
    marker = store.stat(engine_key(rank))
    if marker is None or marker.tag != tag or not marker.sha256:
        return None
    others = []
    for key in store.list(f"{ENGINES}/"):
        rel = key[len(ENGINES) + 1 :]
        if key != marker.key and _belongs_to(rel, rank):
            art = store.stat(key)
            if art is not None and art.tag == tag and art.sha256:
                others.append(art)
    return [*others, marker]


def _result(rank: int, files: list[Artifact], start: float, *, reused: bool) -> dict:
    return {
        "rank": rank,
        "files": [{"file": a.key, "bytes_written": a.bytes, "sha256": a.sha256} for a in files],
        "seconds": round(time.monotonic() - start, 3),
        "reused": reused,
    }


@contextlib.contextmanager
def _workdir(job: str, rank: int) -> Iterator[Path]:
    """A scratch directory under the temp dir (TMPDIR), removed on exit."""
    safe_job = re.sub(r"[^A-Za-z0-9_-]", "_", job)[:32]
    path = Path(tempfile.mkdtemp(prefix=f"porter-engine-{safe_job}-rank{rank}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _fetch_checkpoint(store: ArtifactStore, rank: int, world_size: int, dest: Path) -> Path:
    """Download config.json and this rank's weights (sha256-verified) into `dest`."""
    dest.mkdir()
    store.get_file(CONFIG, dest / CONFIG)
    _check_world_size(dest / CONFIG, world_size, store.uri(CONFIG))
    name = f"rank{rank}.safetensors"
    store.get_file(name, dest / name)
    return dest


def _check_world_size(config: Path, world_size: int, uri: str) -> None:
    """Raise if config.json's mapping disagrees with the job's world size."""
    try:
        mapping = json.loads(config.read_text()).get("mapping") or {}
    except (ValueError, AttributeError) as exc:
        raise ConversionError(f"not a TensorRT-LLM checkpoint config: {exc}", uri) from exc
    found = mapping.get("world_size")
    if found is None and "tp_size" in mapping:
        found = mapping["tp_size"] * mapping.get("pp_size", 1)
    if found is not None and found != world_size:
        raise ConversionError(
            f"the checkpoint's mapping has world size {found}, the job expects {world_size}", uri
        )


def _run_builder(rank: int, ckpt: Path, out: Path, extra_args: list[str], work: Path) -> None:
    """Run the builder for one rank; raise ConversionError with its stderr tail on failure."""
    command = builder_command()
    argv = [
        *command,
        "--rank",
        str(rank),
        "--checkpoint_dir",
        str(ckpt),
        "--output_dir",
        str(out),
        *extra_args,
    ]
    stdout_path, stderr_path = work / "build.stdout", work / "build.stderr"
    log.info("building rank %d engine: %s", rank, shlex.join(argv))
    try:
        with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
            proc = subprocess.run(
                argv, stdout=so, stderr=se, stdin=subprocess.DEVNULL, cwd=work, env=_env(command)
            )
    except OSError as exc:
        raise ConversionError(
            f"cannot run the engine builder {shlex.join(command)!r} ({ENV_COMMAND}): {exc}"
        ) from exc
    if proc.returncode != 0:
        tail = _tail(stderr_path) or _tail(stdout_path) or "(no output)"
        raise ConversionError(
            f"engine build of rank {rank} failed: `{shlex.join(command)}` exited with status "
            f"{proc.returncode}; last lines of its stderr:\n{tail}"
        )


def _env(command: list[str]) -> dict[str, str]:
    """The child's environment: ours (CUDA_VISIBLE_DEVICES included); for the default command,
    with Porter's source root on PYTHONPATH, since the child runs in the scratch directory."""
    env = dict(os.environ)
    if _is_default(command):
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` non-empty lines of a log file (reads at most its last 64 KiB)."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
        text = f.read().decode("utf-8", errors="replace")
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def _belongs_to(rel: str, rank: int) -> bool:
    """Whether output file `rel` is rank `rank`'s to upload: its own `rank{N}*` files, and the
    shared ones (config.json, quant_cfg.json, lora/...) from rank 0 only."""
    match = _RANK_FILE.match(Path(rel).name)
    if match:
        return int(match.group(1)) == rank
    return rank == 0


def _upload(store: ArtifactStore, out: Path, rank: int, tag: str) -> list[Artifact]:
    """Upload this rank's output files under engines/, the engine itself last."""
    engine = out / f"rank{rank}.engine"
    if not engine.is_file():
        raise ConversionError(
            f"the engine builder exited 0 but wrote no rank{rank}.engine", str(out)
        )
    files = sorted(p for p in out.rglob("*") if p.is_file() and p != engine)
    uploaded = []
    for path in [*files, engine]:
        rel = path.relative_to(out).as_posix()
        if not _belongs_to(rel, rank):
            log.warning("rank %d build wrote %s, which is not its to upload; skipped", rank, rel)
            continue
        sha = sha256_file(path)
        uploaded.append(store.put_file(path, f"{ENGINES}/{rel}", sha256=sha, tag=tag, move=True))
    return uploaded


# --------------------------------------------------------------------------------------------
# The default builder: `python -m tasks.kinds.trtllm_engines --rank N <trtllm-build arguments>`


def _split_rank(argv: list[str]) -> tuple[int, list[str]]:
    """Take `--rank N` (or `--rank=N`) out of `argv`; the rest are trtllm-build's arguments."""
    rest, rank = [], None
    items = iter(argv)
    for arg in items:
        if arg == "--rank" or arg.startswith("--rank="):
            value = arg.partition("=")[2] if "=" in arg else next(items, "")
            if rank is not None or not value.isdigit():
                raise SystemExit(
                    "usage: python -m tasks.kinds.trtllm_engines --rank N [trtllm-build args]"
                )
            rank = int(value)
        else:
            rest.append(arg)
    if rank is None:
        raise SystemExit("usage: python -m tasks.kinds.trtllm_engines --rank N [trtllm-build args]")
    return rank, rest


def main(argv: list[str] | None = None) -> int:
    """Run TensorRT-LLM's `trtllm-build` for one rank only (see the module docstring)."""
    rank, rest = _split_rank(list(sys.argv[1:] if argv is None else argv))
    try:
        from tensorrt_llm.commands import build as trtllm_build
    except ImportError as exc:
        print(f"TensorRT-LLM is not installed in {sys.executable}: {exc}", file=sys.stderr)
        return 3

    def one_rank(
        model_config: Any,
        ckpt_dir: str | None,
        build_config: Any,
        output_dir: str,
        workers: int = 1,
        log_level: str = "info",
        model_cls: Any = None,
        **kwargs: Any,
    ) -> None:
        """`parallel_build`'s signature, building only `rank`."""
        world = model_config.mapping.world_size
        if not 0 <= rank < world:
            raise SystemExit(f"--rank {rank} is outside the checkpoint's world size {world}")
        # GPU 0 of this process: a gpu worker sees only its own GPU (CUDA_VISIBLE_DEVICES).
        ok = trtllm_build.build_and_save(
            rank,
            0,
            ckpt_dir,
            build_config,
            output_dir,
            log_level,
            model_config,
            model_cls,
            **kwargs,
        )
        if not ok:
            raise SystemExit(f"TensorRT-LLM's build_and_save failed for rank {rank}")

    trtllm_build.parallel_build = one_rank
    sys.argv = ["trtllm-build", *rest]
    trtllm_build.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
