"""What runs inside the interpreter spawned by ``converters.megatron.example``: the launcher, which
imports megatron once and forks one process per rank, and each rank's work (build the GPTModel of
every needed (tp, pp) configuration, compute the oracle logits, hand the model to
``example_save``).

Only the spawned interpreter imports this module's megatron dependencies (inside functions).
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import torch

from converters.megatron.example import Layout
from converters.megatron.example_moe import (
    is_moe,
    moe_config_kwargs,
    patch_cpu_moe,
    randomize_weights,
)
from converters.megatron.example_norm import use_zero_centred_norms
from converters.megatron.example_save import LAYER_RE, megatron_args, save_legacy, save_torch_dist


def launcher_main(job_file: str) -> None:
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


def _patch_cpu_gaps() -> None:
    """Make megatron-core's CUDA-only calls harmless on a CPU-only host."""
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    # Tied embeddings with PP > 1: the last stage's copy is moved with .cuda() before an all-reduce.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    mrandom.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()
    patch_cpu_moe()


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

    layouts = [Layout(*key) for key in job["paths"]]
    paths = {Layout(*key): Path(p) for key, p in job["paths"].items()}
    # Every (tp, 1, ep) configuration is needed: as layouts, as the oracle (1, 1, 1) and as the
    # weight source of the (tp, pp>1, 1) stage models. PP=1 configurations run first.
    configs = sorted(
        {(1, 1, 1)}
        | {(lay.tp, 1, lay.ep) for lay in layouts}
        | {(lay.tp, lay.pp, lay.ep) for lay in layouts},
        key=lambda c: (c[1], c[2], c[0]),
    )
    pp1_state: dict[int, dict[str, Any]] = {}  # tp -> this rank's TP shard, PP=1, EP=1

    for tp, pp, ep in configs:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            create_gloo_process_groups=False,
        )
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        # Megatron-LM's legacy save: one writer per (tp, pp, ep) shard.
        writer = parallel_state.get_expert_data_parallel_rank() == 0
        model = _build_model(job, tp, pp, ep)
        if pp == 1:
            assert rank % tp == tp_rank  # default "tp-cp-ep-dp-pp" order keeps tp fastest
            if job["hp"]["random_biases_and_norms"]:
                _randomize_biases_and_norms(model, job, tp_rank, tp)
            if is_moe(job["hp"]):
                randomize_weights(model, job, tp_rank, tp, ep_rank, ep)
            if ep == 1:
                pp1_state[tp] = dict(model.state_dict())
        else:
            offset = pp_rank * (job["hp"]["num_layers"] // pp)
            model.load_state_dict(_stage_state(model, pp1_state[tp], offset), strict=True)

        if (tp, pp, ep) == (1, 1, 1) and rank == 0:
            torch.save(_oracle_logits(model, job["tokens"]), job["oracle_file"])

        for layout in layouts:
            if (layout.tp, layout.pp, layout.ep) != (tp, pp, ep):
                continue
            args = megatron_args(job, layout)
            if layout.format == "legacy":
                if writer:
                    save_legacy(
                        model, args, job, paths[layout], (tp_rank, pp_rank, ep_rank), layout
                    )
            else:
                save_torch_dist(model, args, job, paths[layout])
        del model


def _transformer_config(job: dict[str, Any], tp: int, pp: int, ep: int = 1):
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
        layernorm_zero_centered_gamma=_zero_centred(hp),
        qk_layernorm=hp["qk_layernorm"],
        gated_linear_unit=hp["swiglu"] or hp["gemma"],
        activation_func=_activation(hp),
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
        init_method_std=hp["init_method_std"],
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        **moe_config_kwargs(hp, ep),
    )


def _zero_centred(hp: dict[str, Any]) -> bool:
    """Zero-centred norm weights, by the old or the megatron-core 0.16 argument name."""
    return bool(hp["apply_layernorm_1p"] or hp["layernorm_zero_centered_gamma"])


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _activation(hp: dict[str, Any]):
    """SiLU for SwiGLU, tanh GELU for Gemma's GeGLU, exact GELU otherwise."""
    if hp["swiglu"]:
        return torch.nn.functional.silu
    return _gelu_tanh if hp["gemma"] else _gelu


def _scale_embeddings(model: torch.nn.Module, hidden: int) -> None:
    """Gemma's sqrt(hidden) scale on the embedding output (megatron-core's GPTModel has none;
    Megatron-Bridge adds it the same way). The weights stay unscaled."""
    factor = hidden**0.5

    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * factor

    model.embedding.register_forward_hook(hook)


def _build_model(job: dict[str, Any], tp: int, pp: int, ep: int = 1):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    hp = job["hp"]
    config = _transformer_config(job, tp, pp, ep)
    spec = get_gpt_layer_local_spec(
        num_experts=hp["num_experts"],
        moe_grouped_gemm=False,
        normalization=hp["normalization"],
        qk_layernorm=hp["qk_layernorm"],
    )
    if hp["moe_layer_freq"] != 1:  # dense and MoE layers: the block spec picks per layer
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        spec = get_gpt_decoder_block_spec(config, False, normalization=hp["normalization"])
    if _zero_centred(hp):
        spec = use_zero_centred_norms(spec)
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
        rope_scaling=hp["use_rope_scaling"],
        rope_scaling_factor=hp["rope_scaling_factor"],
    )
    if hp["gemma"] and model.pre_process:
        _scale_embeddings(model, hp["hidden_size"])
    model.eval()
    return model


@torch.no_grad()
def _randomize_biases_and_norms(
    model: torch.nn.Module, job: dict[str, Any], tp_rank: int, tp: int
) -> None:
    """Give every bias and norm weight (megatron-core starts them at 0 and 1) random values.

    Each parameter's global values come from the seed and its name alone; a TP-split one gets
    this rank's share as Megatron splits it (a gated fc1 bias: [gate_r; up_r]), so all (tp, 1)
    configurations hold the same model."""
    for name, param in model.named_parameters():
        norm = "layernorm" in name or "layer_norm" in name
        if not (norm or name.endswith(".bias")):
            continue
        split = getattr(param, "tensor_model_parallel", False)
        dim = getattr(param, "partition_dim", 0) if split else 0
        shape = list(param.shape)
        shape[dim] *= tp if split else 1
        gen = torch.Generator().manual_seed(job["seed"] * 7919 + zlib.crc32(name.encode()))
        values = 0.3 * torch.randn(shape, generator=gen) + (1.0 if norm else 0.0)
        if split and name.endswith("mlp.linear_fc1.bias") and job["hp"]["swiglu"]:
            values = torch.cat([half.chunk(tp, dim)[tp_rank] for half in values.chunk(2, dim)], dim)
        elif split:
            values = values.chunk(tp, dim)[tp_rank]
        param.copy_(values.to(param.dtype))


def _stage_state(
    model: torch.nn.Module, full: dict[str, torch.Tensor], offset: int
) -> dict[str, torch.Tensor]:
    """The PP=1 weights a pipeline-stage model needs, renamed to its stage-local layer numbers."""
    out = {}
    for key in model.state_dict():
        m = LAYER_RE.match(key)
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
