"""Write real Megatron-LM checkpoints on CPU with megatron-core (example models and test fixtures).

The models are real ``megatron.core.models.gpt.GPTModel`` instances built with the local layer
spec under a gloo process group, one process per rank. One call starts one fresh interpreter (the
caller never imports megatron nor gets its CPU patches), which imports megatron once and forks
``W`` rank processes (``W`` the least common multiple of every requested ``tp * pp``). The ranks
walk through every needed (tp, pp) configuration in turn, re-initialising Megatron's
model-parallel state each time (spare ranks are data-parallel replicas that write nothing).

All layouts written by one call hold the same weights: with ``use_cpu_initialization`` the full
master weight is initialised from the seed and split per TP rank, and pipeline-stage models load
the weights of the PP=1 model of the same TP size. The TP=1, PP=1 model's own forward output on
``tokens`` is returned as the oracle for converters.

This module is the caller's side: it checks the request, spawns the launcher and collects the
result. What runs inside the spawned interpreter lives in ``example_ranks`` (build and run the
models) and ``example_save`` (write them as Megatron-LM does). ``megatron`` is never imported
here: this module is importable without it.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from converters.megatron.example_moe import MOE_DEFAULTS, is_moe, moe_families

__all__ = [
    "FAMILIES",
    "ExampleCheckpoints",
    "Layout",
    "write_example_checkpoint",
    "write_example_checkpoints",
]

_INSTALL_HINT = (
    "megatron-core is needed to write example checkpoints: pip install 'porter[example]'"
)


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout: on-disk format plus tensor-, pipeline- and expert-parallel sizes."""

    format: Literal["legacy", "torch_dist"]
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallelism (MoE families only)

    def __post_init__(self) -> None:
        if self.format not in ("legacy", "torch_dist"):
            raise ValueError(f"unknown checkpoint format {self.format!r}")
        if self.tp < 1 or self.pp < 1 or self.ep < 1:
            raise ValueError(f"tp, pp and ep must be >= 1, got {self.tp}, {self.pp}, {self.ep}")

    @property
    def dirname(self) -> str:
        """Directory name for this layout, e.g. ``legacy_tp2_pp1`` (``..._ep2`` with EP)."""
        suffix = f"_ep{self.ep}" if self.ep > 1 else ""
        return f"{self.format}_tp{self.tp}_pp{self.pp}{suffix}"

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.format, self.tp, self.pp, self.ep)


@dataclass
class ExampleCheckpoints:
    """Result of :func:`write_example_checkpoints`."""

    paths: dict[Layout, Path]
    """Checkpoint root (holding ``latest_checkpointed_iteration.txt``) per layout."""
    tokens: torch.Tensor
    """int64 ``[seq]``: the input the oracle logits were computed on."""
    logits: torch.Tensor
    """float32 ``[seq, padded_vocab_size]``: the TP=1, PP=1 Megatron model's output on ``tokens``."""


FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {
        "num_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_query_groups": 2,
        "kv_channels": 8,
        "ffn_hidden_size": 128,
        "padded_vocab_size": 102,
        "max_position_embeddings": 64,
        "normalization": "RMSNorm",
        "swiglu": True,
        "position_embedding_type": "rope",
        "rotary_base": 10000,
        "rotary_percent": 1.0,
        "untie_embeddings_and_output_weights": True,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "norm_epsilon": 1e-5,
        "apply_layernorm_1p": False,
    },
    "gpt": {
        "num_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_query_groups": 8,
        "kv_channels": None,
        "ffn_hidden_size": 256,
        "padded_vocab_size": 98,
        "max_position_embeddings": 64,
        "normalization": "LayerNorm",
        "swiglu": False,
        "position_embedding_type": "learned_absolute",
        "rotary_base": 10000,
        "rotary_percent": 1.0,
        "untie_embeddings_and_output_weights": False,
        "add_bias_linear": True,
        "add_qkv_bias": True,
        "norm_epsilon": 1e-5,
        "apply_layernorm_1p": False,
    },
}

# Settings the first families leave at these values (so their checkpoints stay as they were).
_DEFAULTS: dict[str, Any] = {
    "qk_layernorm": False,
    "use_rope_scaling": False,
    "rope_scaling_factor": 8.0,
    "init_method_std": 0.02,
    # Random biases and norm weights (megatron-core initialises them to 0 and 1, which hides a
    # bias or norm weight converted into the wrong place).
    "random_biases_and_norms": False,
    # Megatron-LM core 0.16's name for --apply-layernorm-1p (saved in args under this name only).
    "layernorm_zero_centered_gamma": False,
    # Gemma: GeGLU (tanh GELU) and the sqrt(hidden) embedding scale (example_ranks applies both).
    "gemma": False,
    **MOE_DEFAULTS,
}

# The dense Hugging Face families: attention weights large enough (init_method_std) that
# attention details (rotary scaling, q/k norms, QKV biases) move the logits measurably.
_LLAMA_STYLE = {**FAMILIES["llama"], "init_method_std": 0.1, "random_biases_and_norms": True}
FAMILIES |= {
    # Llama 3.1: GQA with --use-rope-scaling (factor 8). With rotary_base 1e6 and d = 8 the
    # lowest frequencies have wavelengths of 6283 (smoothed) and 198,692 (divided by 8) tokens.
    # Positions beyond the scaling's original 8192 (rotary positions cost nothing until used).
    "llama31": {
        **_LLAMA_STYLE,
        "rotary_base": 1000000,
        "max_position_embeddings": 16384,
        "use_rope_scaling": True,
        "rope_scaling_factor": 8.0,
    },
    # Qwen2: QKV biases only, tied embeddings.
    "qwen2": {
        **_LLAMA_STYLE,
        "rotary_base": 1000000,
        "untie_embeddings_and_output_weights": False,
        "add_qkv_bias": True,
    },
    # Qwen3: per-head q/k RMSNorm, head size 16 with 8 heads (128 ≠ hidden 64), no biases.
    "qwen3": {
        **_LLAMA_STYLE,
        "rotary_base": 1000000,
        "kv_channels": 16,
        "qk_layernorm": True,
    },
}
# Qwen3 with zero-centred norm weights (every norm, q/k included, computes 1 + weight), saved
# under megatron-core 0.16's argument name only, as Megatron-LM core 0.16 saves it.
FAMILIES["qwen3_1p"] = {**FAMILIES["qwen3"], "layernorm_zero_centered_gamma": True}
# StarCoder (GPTBigCode): GPT with multi-query attention (one KV head). megatron-core splits
# query groups over TP, so it is written at TP=1 only; converters duplicate the KV head.
FAMILIES["starcoder"] = {
    **FAMILIES["gpt"],
    "num_query_groups": 1,
    "init_method_std": 0.1,
    "random_biases_and_norms": True,
}


# Gemma (v1): GeGLU with tanh GELU, embeddings scaled by sqrt(hidden) (a hook on the embedding:
# megatron-core has no such scale), zero-centred RMSNorm, tied embeddings, GQA with head size
# 16 (128 ≠ hidden 64). The args record none of the first two: converters need the declaration.
FAMILIES["gemma"] = {
    **_LLAMA_STYLE,
    "swiglu": False,
    "gemma": True,
    "kv_channels": 16,
    "untie_embeddings_and_output_weights": False,
    "layernorm_zero_centered_gamma": True,
}
FAMILIES |= moe_families(_LLAMA_STYLE)

# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def write_example_checkpoints(
    root: Path,
    family: str,
    layouts: Sequence[Layout],
    *,
    seed: int = 1234,
    iteration: int = 10,
    dtype: torch.dtype = torch.float32,
    transformer_engine_names: bool = False,
    overrides: dict[str, Any] | None = None,
    seq_len: int = 16,
) -> ExampleCheckpoints:
    """Write one checkpoint per layout under ``root / layout.dirname``, all with the same weights.

    Returns the paths, the oracle input ``tokens`` and the TP=1, PP=1 model's fp32 logits.
    """
    root = Path(root)
    paths = {layout: root / layout.dirname for layout in dict.fromkeys(layouts)}
    return _write(
        paths,
        family,
        seed=seed,
        iteration=iteration,
        dtype=dtype,
        transformer_engine_names=transformer_engine_names,
        overrides=overrides,
        seq_len=seq_len,
    )


def write_example_checkpoint(
    path: Path,
    family: str = "llama",
    tp: int = 1,
    pp: int = 1,
    format: str = "legacy",
    **kwargs: Any,
) -> Path:
    """Write a single layout directly at ``path`` (convenience for the CLI); returns ``path``.

    ``kwargs`` are those of :func:`write_example_checkpoints` (seed, iteration, dtype, ...).
    """
    layout = Layout(format, tp, pp, kwargs.pop("ep", 1))  # type: ignore[arg-type]
    path = Path(path)
    _write({layout: path}, family, **kwargs)
    return path


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def _model_hparams(family: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {sorted(FAMILIES)}")
    hp = {**_DEFAULTS, **FAMILIES[family]}
    unknown = set(overrides or {}) - set(hp)
    if unknown:
        raise ValueError(f"unknown override keys {sorted(unknown)}; known: {sorted(hp)}")
    hp.update(overrides or {})
    if hp["kv_channels"] is None:
        hp["kv_channels"] = hp["hidden_size"] // hp["num_attention_heads"]
    if hp["num_query_groups"] is None:
        hp["num_query_groups"] = hp["num_attention_heads"]
    return hp


def _check_megatron() -> None:
    import importlib.util

    try:
        found = importlib.util.find_spec("megatron.core") is not None
    except ImportError:  # no "megatron" package at all
        found = False
    if not found:
        raise RuntimeError(_INSTALL_HINT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(job: dict[str, Any], tmp: Path, timeout: float = 900.0) -> None:
    """Run the ranks in a fresh interpreter that imports megatron once, then forks one process
    per rank (the caller's process is never touched by megatron's imports or CPU patches)."""
    job_file = tmp / "job.pt"
    torch.save(job, job_file)
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    code = "import sys; from converters.megatron.example_ranks import launcher_main; launcher_main(sys.argv[1])"
    cmd = [sys.executable, "-c", code, str(job_file)]
    try:
        proc = subprocess.run(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"writing Megatron example checkpoints timed out after {timeout}s"
        ) from exc
    if proc.returncode != 0:
        tail = proc.stdout.decode(errors="replace")[-6000:]
        raise RuntimeError(f"writing Megatron example checkpoints failed:\n{tail}")


def _write(
    paths: dict[Layout, Path],
    family: str,
    *,
    seed: int = 1234,
    iteration: int = 10,
    dtype: torch.dtype = torch.float32,
    transformer_engine_names: bool = False,
    overrides: dict[str, Any] | None = None,
    seq_len: int = 16,
) -> ExampleCheckpoints:
    hp = _model_hparams(family, overrides)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if seq_len > hp["max_position_embeddings"]:
        raise ValueError("seq_len exceeds max_position_embeddings")
    for layout in paths:
        if hp["num_layers"] % layout.pp:
            raise ValueError(f"num_layers={hp['num_layers']} is not divisible by pp={layout.pp}")
        if layout.ep > 1 and (not is_moe(hp) or layout.pp > 1 or hp["num_experts"] % layout.ep):
            raise ValueError(f"ep={layout.ep} needs a MoE family, PP=1 and experts % ep == 0")
    _check_megatron()

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, hp["padded_vocab_size"], (seq_len,), generator=gen, dtype=torch.int64)

    world = math.lcm(1, *(layout.tp * layout.pp * layout.ep for layout in paths))
    for path in paths.values():
        if path.is_dir() and any(path.iterdir()):
            # Replace an earlier checkpoint, but never wipe an unrelated directory.
            if not (path / "latest_checkpointed_iteration.txt").is_file():
                raise FileExistsError(f"{path} exists, is not empty and is not a checkpoint")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="porter-megatron-") as tmp:
        job = {
            "hp": hp,
            "paths": {lay.key: str(p) for lay, p in paths.items()},
            "seed": seed,
            "iteration": iteration,
            "dtype": dtype,
            "te_names": transformer_engine_names,
            "tokens": tokens,
            "oracle_file": str(Path(tmp) / "oracle.pt"),
            "port": _free_port(),
            "world": world,
        }
        _spawn_ranks(job, Path(tmp))
        logits = torch.load(job["oracle_file"], weights_only=True)
    return ExampleCheckpoints(paths=dict(paths), tokens=tokens, logits=logits)
