#!/usr/bin/env python3
"""A stand-in for Porter's one-rank `trtllm-build` command, for tests of the process boundary.

It takes what the real command takes (`--rank N --checkpoint_dir D --output_dir O` plus a few
trtllm-build options; anything else is an argparse error, as in trtllm-build), checks that D holds
config.json and exactly this rank's safetensors file, and writes `rankN.engine` (and, from rank 0,
`config.json`) whose bytes depend on the inputs. Standard library only.

Environment:
- FAKE_TRTLLM_LOG: append one JSON line per invocation (argv, checkpoint files, options).
- FAKE_TRTLLM_FAIL: print many lines to stderr, the last one this text, and exit 1.
- FAKE_TRTLLM_NO_ENGINE: exit 0 without writing the engine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


def parse(argv: list[str]) -> argparse.Namespace:
    """trtllm-build's argument style: --name value, store_true flags, nargs='+' lists."""
    p = argparse.ArgumentParser(prog="trtllm-build")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--checkpoint_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--max_input_len", type=int, default=1024)
    p.add_argument("--max_seq_len", type=int, default=None)
    p.add_argument("--gemm_plugin", default="auto")
    p.add_argument("--strip_plan", action="store_true")
    p.add_argument("--lora_target_modules", nargs="+", default=None)
    return p.parse_args(argv)


def fail(message: str, code: int = 2) -> None:
    print(f"[fake trtllm-build] error: {message}", file=sys.stderr)
    sys.exit(code)


def safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return sorted(k for k in header if k != "__metadata__")


def check_checkpoint(ckpt: Path, rank: int) -> dict:
    """config.json and exactly rank{rank}.safetensors; returns the config."""
    config_path = ckpt / "config.json"
    if not config_path.is_file():
        fail(f"{config_path} does not exist")
    config = json.loads(config_path.read_text())
    world = config["mapping"]["world_size"]
    if not 0 <= rank < world:
        fail(f"--rank {rank} is outside world size {world}")
    expected = {"config.json", f"rank{rank}.safetensors"}
    present = {p.name for p in ckpt.iterdir()}
    if present != expected:
        fail(f"checkpoint dir holds {sorted(present)}, expected {sorted(expected)}")
    if not safetensors_names(ckpt / f"rank{rank}.safetensors"):
        fail(f"rank{rank}.safetensors holds no tensors")
    return config


def engine_bytes(ckpt: Path, rank: int, options: dict) -> bytes:
    """Deterministic engine bytes: a digest of the config, the rank file and the options."""
    digest = hashlib.sha256()
    digest.update((ckpt / "config.json").read_bytes())
    digest.update((ckpt / f"rank{rank}.safetensors").read_bytes())
    digest.update(json.dumps(options, sort_keys=True).encode())
    return b"FAKE-TRT-ENGINE\n" + f"rank={rank}\n".encode() + digest.hexdigest().encode() + b"\n"


def main(argv: list[str]) -> None:
    args = parse(argv)
    options = {
        k: v for k, v in vars(args).items() if k not in ("rank", "checkpoint_dir", "output_dir")
    }
    ckpt, out = Path(args.checkpoint_dir), Path(args.output_dir)
    if os.environ.get("FAKE_TRTLLM_LOG"):
        with open(os.environ["FAKE_TRTLLM_LOG"], "a") as f:
            files = sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else None
            f.write(
                json.dumps({"argv": argv, "checkpoint_files": files, "options": options}) + "\n"
            )
    print(f"[fake trtllm-build] building rank {args.rank}", flush=True)
    if os.environ.get("FAKE_TRTLLM_FAIL"):
        for i in range(200):
            print(f"[fake trtllm-build] noise line {i}", file=sys.stderr)
        fail(os.environ["FAKE_TRTLLM_FAIL"], code=1)
    config = check_checkpoint(ckpt, args.rank)
    if not out.is_dir():
        fail(f"--output_dir {out} is not a directory")
    if os.environ.get("FAKE_TRTLLM_NO_ENGINE"):
        return
    (out / f"rank{args.rank}.engine").write_bytes(engine_bytes(ckpt, args.rank, options))
    if args.rank == 0:
        engine_config = {"version": "fake", "pretrained_config": config, "build_config": options}
        (out / "config.json").write_text(json.dumps(engine_config, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
