"""How each rank of ``converters.megatron.example_ranks`` saves its model, as Megatron-LM's training
loop does: the ``args`` Namespace, legacy ``model_optim_rng.pt`` files (optionally with Transformer
Engine names and ``_extra_state``) or a ``torch_dist`` directory, and the iteration tracker.

Runs only inside the spawned rank processes; ``megatron`` is imported inside functions.
"""

from __future__ import annotations

import argparse
import io
import queue
import re
from pathlib import Path
from typing import Any

import torch

from converters.megatron.example import Layout
from converters.megatron.example_moe import grouped_expert_state, moe_args

LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def megatron_args(job: dict[str, Any], layout: Layout) -> argparse.Namespace:
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
        layernorm_zero_centered_gamma=hp["layernorm_zero_centered_gamma"],
        position_embedding_type=hp["position_embedding_type"],
        rotary_base=hp["rotary_base"],
        rotary_percent=hp["rotary_percent"],
        rotary_interleaved=False,
        use_rope_scaling=hp["use_rope_scaling"],
        rope_scaling_factor=hp["rope_scaling_factor"],
        max_position_embeddings=hp["max_position_embeddings"],
        seq_length=hp["max_position_embeddings"],
        padded_vocab_size=hp["padded_vocab_size"],
        make_vocab_size_divisible_by=1,
        untie_embeddings_and_output_weights=hp["untie_embeddings_and_output_weights"],
        add_bias_linear=hp["add_bias_linear"],
        add_qkv_bias=hp["add_qkv_bias"],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=hp["init_method_std"],
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=None,
        sequence_parallel=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **moe_args(hp, layout.ep),
        qk_layernorm=hp["qk_layernorm"],
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
        m = LAYER_RE.match(key)
        if m:
            prefix, rest = key[: m.end()], key[m.end() :]
            if rest.startswith("input_layernorm."):
                rest = "self_attention.linear_qkv.layer_norm_" + rest.split(".", 1)[1]
            elif rest.startswith("pre_mlp_layernorm."):
                rest = "mlp.linear_fc1.layer_norm_" + rest.split(".", 1)[1]
            key = prefix + rest
        out[key] = value
    layers = sorted({int(m.group(1)) for k in out if (m := LAYER_RE.match(k))})
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


def save_legacy(
    model: torch.nn.Module,
    args: argparse.Namespace,
    job: dict[str, Any],
    root: Path,
    ranks: tuple[int, int, int],
    layout: Layout,
) -> None:
    """Write this (tp, pp, ep) rank's `mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt` (Megatron-LM's
    `get_checkpoint_name`: the PP part when PP > 1, the EP part when EP > 1)."""
    import random

    tp_rank, pp_rank, ep_rank = ranks
    iteration = job["iteration"]
    name = f"mp_rank_{tp_rank:02d}"
    name += f"_{pp_rank:03d}" if layout.pp > 1 else ""
    name += f"_{ep_rank:03d}" if layout.ep > 1 else ""
    rank_dir = root / f"iter_{iteration:07d}" / name
    rank_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = grouped_expert_state(
        dict(model.state_dict()), job["hp"]["expert_layout"]
    )
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
    if tp_rank == 0 and pp_rank == 0 and ep_rank == 0:
        _write_tracker(root, iteration)


def save_torch_dist(
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
