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

``megatron`` is imported lazily, inside functions: this module is importable without it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import queue
import re
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
    """One checkpoint layout: on-disk format plus tensor- and pipeline-parallel sizes."""

    format: Literal["legacy", "torch_dist"]
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.format not in ("legacy", "torch_dist"):
            raise ValueError(f"unknown checkpoint format {self.format!r}")
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")

    @property
    def dirname(self) -> str:
        """Directory name for this layout, e.g. ``legacy_tp2_pp1``."""
        return f"{self.format}_tp{self.tp}_pp{self.pp}"


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
    layout = Layout(format, tp, pp)  # type: ignore[arg-type]
    path = Path(path)
    _write({layout: path}, family, **kwargs)
    return path


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def _model_hparams(family: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {sorted(FAMILIES)}")
    hp = dict(FAMILIES[family])
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
    code = "import sys; from converters.megatron.example import _launcher_main; _launcher_main(sys.argv[1])"
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


def _launcher_main(job_file: str) -> None:
    """Entry point of the launcher process: import megatron once, fork one process per rank."""
    import torch.multiprocessing as mp

    job = torch.load(job_file, weights_only=True)
    # Import everything the ranks use before forking, so it is imported once for all ranks.
    import megatron.core.dist_checkpointing
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    from megatron.core import parallel_state  # noqa: F401
    from megatron.core.models.gpt import GPTModel  # noqa: F401

    _patch_cpu_gaps()
    mp.start_processes(_worker, args=(job,), nprocs=job["world"], join=True, start_method="fork")


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
    _check_megatron()

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, hp["padded_vocab_size"], (seq_len,), generator=gen, dtype=torch.int64)

    world = math.lcm(1, *(layout.tp * layout.pp for layout in paths))
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
            "paths": {(lay.format, lay.tp, lay.pp): str(p) for lay, p in paths.items()},
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


# --------------------------------------------------------------------------------------------
# Child side (runs in each spawned rank process)
# --------------------------------------------------------------------------------------------


def _patch_cpu_gaps() -> None:
    """Make megatron-core's CUDA-only calls harmless on a CPU-only host."""
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    # Tied embeddings with PP > 1: the last stage's copy is moved with .cuda() before an all-reduce.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    mrandom.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()


def _worker(rank: int, job: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(job["port"])
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=job["world"])
    _run_configs(rank, job)
    dist.barrier()
    # Everything is written. Tearing gloo down costs ~1 s per process; this process is
    # disposable, so leave without it (os._exit skips interpreter teardown, exit status 0).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_configs(rank: int, job: dict[str, Any]) -> None:
    from megatron.core import parallel_state

    layouts = [Layout(f, tp, pp) for (f, tp, pp) in job["paths"]]
    paths = {Layout(f, tp, pp): Path(p) for (f, tp, pp), p in job["paths"].items()}
    # Every (tp, 1) configuration is needed: as layouts, as the oracle (tp=1) and as the weight
    # source of the (tp, pp>1) stage models. PP=1 configurations run first.
    configs = sorted(
        {(1, 1)} | {(lay.tp, 1) for lay in layouts} | {(lay.tp, lay.pp) for lay in layouts},
        key=lambda c: (c[1], c[0]),
    )
    pp1_state: dict[int, dict[str, Any]] = {}  # tp -> this rank's TP shard, PP=1

    for tp, pp in configs:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            create_gloo_process_groups=False,
        )
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        model = _build_model(job, tp, pp)
        if pp == 1:
            assert rank % tp == tp_rank  # default "tp-cp-ep-dp-pp" order keeps tp fastest
            pp1_state[tp] = dict(model.state_dict())
        else:
            offset = pp_rank * (job["hp"]["num_layers"] // pp)
            model.load_state_dict(_stage_state(model, pp1_state[tp], offset), strict=True)

        if (tp, pp) == (1, 1) and rank == 0:
            torch.save(_oracle_logits(model, job["tokens"]), job["oracle_file"])

        for layout in layouts:
            if (layout.tp, layout.pp) != (tp, pp):
                continue
            args = _megatron_args(job, layout)
            if layout.format == "legacy":
                if dp_rank == 0:
                    _save_legacy(model, args, job, paths[layout], tp_rank, pp_rank, pp)
            else:
                _save_torch_dist(model, args, job, paths[layout])
        del model


def _transformer_config(job: dict[str, Any], tp: int, pp: int):
    from megatron.core.transformer import TransformerConfig

    hp = job["hp"]
    dtype = job["dtype"]
    return TransformerConfig(
        num_layers=hp["num_layers"],
        hidden_size=hp["hidden_size"],
        ffn_hidden_size=hp["ffn_hidden_size"],
        num_attention_heads=hp["num_attention_heads"],
        num_query_groups=hp["num_query_groups"],
        kv_channels=hp["kv_channels"],
        normalization=hp["normalization"],
        layernorm_epsilon=hp["norm_epsilon"],
        layernorm_zero_centered_gamma=hp["apply_layernorm_1p"],
        gated_linear_unit=hp["swiglu"],
        activation_func=torch.nn.functional.silu if hp["swiglu"] else _gelu,
        bias_activation_fusion=False,
        add_bias_linear=hp["add_bias_linear"],
        add_qkv_bias=hp["add_qkv_bias"],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method_std=0.02,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
    )


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x)


def _build_model(job: dict[str, Any], tp: int, pp: int):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    hp = job["hp"]
    config = _transformer_config(job, tp, pp)
    spec = get_gpt_layer_local_spec(normalization=hp["normalization"])
    torch.manual_seed(job["seed"])
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=hp["padded_vocab_size"],
        max_sequence_length=hp["max_position_embeddings"],
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=False,
        share_embeddings_and_output_weights=not hp["untie_embeddings_and_output_weights"],
        position_embedding_type=hp["position_embedding_type"],
        rotary_percent=hp["rotary_percent"],
        rotary_base=hp["rotary_base"],
    )
    model.eval()
    return model


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def _stage_state(
    model: torch.nn.Module, full: dict[str, torch.Tensor], offset: int
) -> dict[str, torch.Tensor]:
    """The PP=1 weights a pipeline-stage model needs, renamed to its stage-local layer numbers."""
    out = {}
    for key in model.state_dict():
        m = _LAYER_RE.match(key)
        src = key
        if m:
            src = f"decoder.layers.{int(m.group(1)) + offset}.{key[m.end() :]}"
        if src not in full and key == "output_layer.weight":
            src = "embedding.word_embeddings.weight"  # tied embeddings: last stage's copy
        out[key] = full[src]
    return out


@torch.no_grad()
def _oracle_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    seq = tokens.numel()
    input_ids = tokens.view(1, seq)
    position_ids = torch.arange(seq, dtype=torch.int64).view(1, seq)
    # Megatron masks: True = masked out; [b, 1, s, s].
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    logits = model(input_ids, position_ids, mask)  # [b, s, V]
    return logits[0].float().contiguous()


def _megatron_args(job: dict[str, Any], layout: Layout) -> argparse.Namespace:
    """Training arguments as Megatron-LM's argparse would store them."""
    from megatron.core.enums import ModelType

    hp = job["hp"]
    dtype = job["dtype"]
    return argparse.Namespace(
        num_layers=hp["num_layers"],
        hidden_size=hp["hidden_size"],
        ffn_hidden_size=hp["ffn_hidden_size"],
        num_attention_heads=hp["num_attention_heads"],
        group_query_attention=hp["num_query_groups"] != hp["num_attention_heads"],
        num_query_groups=hp["num_query_groups"],
        kv_channels=hp["kv_channels"],
        swiglu=hp["swiglu"],
        normalization=hp["normalization"],
        norm_epsilon=hp["norm_epsilon"],
        apply_layernorm_1p=hp["apply_layernorm_1p"],
        position_embedding_type=hp["position_embedding_type"],
        rotary_base=hp["rotary_base"],
        rotary_percent=hp["rotary_percent"],
        rotary_interleaved=False,
        max_position_embeddings=hp["max_position_embeddings"],
        seq_length=hp["max_position_embeddings"],
        padded_vocab_size=hp["padded_vocab_size"],
        make_vocab_size_divisible_by=1,
        untie_embeddings_and_output_weights=hp["untie_embeddings_and_output_weights"],
        add_bias_linear=hp["add_bias_linear"],
        add_qkv_bias=hp["add_qkv_bias"],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=None,
        sequence_parallel=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        num_experts=None,
        qk_layernorm=False,
        transformer_impl="transformer_engine" if job["te_names"] else "local",
        ckpt_format="torch" if layout.format == "legacy" else "torch_dist",
        use_dist_ckpt=layout.format == "torch_dist",
        model_type=ModelType.encoder_or_decoder,
        iteration=job["iteration"],
        micro_batch_size=1,
        global_batch_size=8,
        seed=job["seed"],
    )


def _write_tracker(root: Path, iteration: int) -> None:
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def _te_rename(state: dict[str, Any]) -> dict[str, Any]:
    """Emulate a Transformer Engine checkpoint: fused-norm names plus ``_extra_state`` entries."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = _LAYER_RE.match(key)
        if m:
            prefix, rest = key[: m.end()], key[m.end() :]
            if rest.startswith("input_layernorm."):
                rest = "self_attention.linear_qkv.layer_norm_" + rest.split(".", 1)[1]
            elif rest.startswith("pre_mlp_layernorm."):
                rest = "mlp.linear_fc1.layer_norm_" + rest.split(".", 1)[1]
            key = prefix + rest
        out[key] = value
    layers = sorted({int(m.group(1)) for k in out if (m := _LAYER_RE.match(k))})
    for i in layers:
        for mod in (
            "self_attention.core_attention",
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        ):
            out[f"decoder.layers.{i}.{mod}._extra_state"] = io.BytesIO()
    return out


def _fake_optimizer_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A torch Adam ``state_dict()`` shaped like this rank's parameters (fp32 moments)."""
    params = [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return {
        "state": {
            i: {
                "step": torch.tensor(10.0),
                "exp_avg": torch.zeros(p.shape, dtype=torch.float32),
                "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32),
            }
            for i, p in enumerate(params)
        },
        "param_groups": [
            {
                "lr": 3e-4,
                "betas": (0.9, 0.95),
                "eps": 1e-8,
                "weight_decay": 0.1,
                "amsgrad": False,
                "maximize": False,
                "foreach": None,
                "capturable": False,
                "differentiable": False,
                "fused": None,
                "params": list(range(len(params))),
            }
        ],
    }


def _save_legacy(
    model: torch.nn.Module,
    args: argparse.Namespace,
    job: dict[str, Any],
    root: Path,
    tp_rank: int,
    pp_rank: int,
    pp: int,
) -> None:
    import random

    iteration = job["iteration"]
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    rank_dir = root / f"iter_{iteration:07d}" / name
    rank_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = dict(model.state_dict())
    if job["te_names"]:  # torch_dist always stores the fused names: nothing to emulate there
        state = _te_rename(state)
    checkpoint = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "model": state,
        "optimizer": _fake_optimizer_state(state),
        "opt_param_scheduler": {"max_lr": 3e-4, "min_lr": 3e-5, "num_steps": iteration * 8},
        "rng_state": [
            {
                "random_rng_state": random.getstate(),
                "torch_rng_state": torch.get_rng_state(),
                "rng_tracker_states": {},
            }
        ],
        "num_floating_point_operations_so_far": 0,
    }
    torch.save(checkpoint, rank_dir / "model_optim_rng.pt")
    if tp_rank == 0 and pp_rank == 0:
        _write_tracker(root, iteration)


def _save_torch_dist(
    model: torch.nn.Module, args: argparse.Namespace, job: dict[str, Any], root: Path
) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    iteration = job["iteration"]
    iter_dir = root / f"iter_{iteration:07d}"
    if dist.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    # As Megatron-LM's training loop does: the model's sharded state under "model"; plain entries
    # land in common.pt.
    sharded = {
        "model": model.sharded_state_dict(),
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": iteration,
    }
    # megatron's filesystem writer hands its results over through a *spawned* Manager queue,
    # whose server must import torch to unpickle them (~2 s); the save runs synchronously in
    # this process, so a plain in-process queue does the same job.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded, str(iter_dir))
    if dist.get_rank() == 0:
        _write_tracker(root, iteration)
    dist.barrier()
