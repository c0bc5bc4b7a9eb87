"""Baseline: the path a user of megatron-core's own TensorRT-LLM exporter takes, on CPU.

1. `torch.load` the TP=1, PP=1 legacy checkpoint fully into memory (no mmap);
2. `TRTLLMHelper(...).get_trtllm_pretrained_config_and_model_weights(state_dict, ...,
   on_device_distributed_conversion=False)`, which runs `SingleDeviceTRTLLMModelWeightsConverter`
   with the `DEFAULT_CONVERSION_DICT` name mapping and returns one weights dict per target rank;
3. `safetensors.torch.save_file(weights, OUT/rank{N}.safetensors)` per rank (plus the config the
   helper built, as `config.json`, for reference).

TensorRT-LLM is not installed here (it needs a GPU). The exporter only touches a few of its names,
so this script, and only this script, registers trivial stand-ins in `sys.modules` before
importing megatron-core's exporter (see `install_tensorrt_llm_stand_ins`):

- `tensorrt_llm._utils.pad_vocab_size(v, tp)`: round v up to a multiple of tp (TRT-LLM's own rule);
- `tensorrt_llm._utils.str_dtype_to_torch(name)`: "bfloat16"/"float16"/"float32" → torch dtype;
- `tensorrt_llm.Mapping(world_size, rank, tp_size, pp_size)`: tp_rank, pp_rank, pp_layers(n),
  is_first_pp_rank(), is_last_pp_rank(), as in TRT-LLM's `Mapping` (contiguous layer ranges);
- `tensorrt_llm.functional.non_gated_version(act)`: "swiglu" → "silu", "geglu" → "gelu";
- `tensorrt_llm.layers.MoeConfig.ExpertScaleNormalizationMode.RENORMALIZE`: an enum member
  (only copied into the config dict);
- `tensorrt_llm.models.{gpt.config.GPTConfig, llama.config.LLaMAConfig, GemmaConfig,
  falcon.config.FalconConfig, nemotron_nas.config.DeciConfig}`: a plain class that keeps its
  keyword arguments as attributes (the helper only builds it and sets `.mapping`).

None of these touch tensor data: the weights are produced by megatron-core's code alone.

Usage: python bench/megatron_exporter_baseline.py SOURCE_ROOT OUTPUT --tp T
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch


class _Mapping:
    """Stand-in for `tensorrt_llm.Mapping` (TP × PP, contiguous pipeline layer ranges)."""

    def __init__(
        self, world_size: int = 1, rank: int = 0, tp_size: int = 1, pp_size: int = 1, **_: Any
    ) -> None:
        self.world_size, self.rank, self.tp_size, self.pp_size = world_size, rank, tp_size, pp_size
        self.tp_rank = rank % tp_size
        self.pp_rank = rank // tp_size

    def pp_layers(self, num_layers: int) -> list[int]:
        per_stage = num_layers // self.pp_size
        return list(range(self.pp_rank * per_stage, (self.pp_rank + 1) * per_stage))

    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def to_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size}


class _PretrainedConfig:
    """Stand-in for TRT-LLM's model config classes: keeps the keyword arguments."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for k, v in self.__dict__.items():
            if isinstance(v, _Mapping):
                v = v.to_dict()
            elif isinstance(v, enum.Enum):
                v = v.name
            out[k] = v
        return out


class _ExpertScaleNormalizationMode(enum.IntEnum):
    NONE = 0
    RENORMALIZE = 1


def _pad_vocab_size(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


def _str_dtype_to_torch(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _non_gated_version(activation: str) -> str:
    return {"swiglu": "silu", "geglu": "gelu", "gegelu": "gelu"}.get(activation, activation)


def install_tensorrt_llm_stand_ins() -> None:
    """Register the `tensorrt_llm` stand-ins listed in the module docstring in `sys.modules`."""

    def module(name: str, **attrs: Any) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    moe_config = type(
        "MoeConfig", (), {"ExpertScaleNormalizationMode": _ExpertScaleNormalizationMode}
    )
    cfg = _PretrainedConfig
    gpt = module(
        "tensorrt_llm.models.gpt", config=module("tensorrt_llm.models.gpt.config", GPTConfig=cfg)
    )
    llama = module(
        "tensorrt_llm.models.llama",
        config=module("tensorrt_llm.models.llama.config", LLaMAConfig=cfg),
    )
    falcon = module(
        "tensorrt_llm.models.falcon",
        config=module("tensorrt_llm.models.falcon.config", FalconConfig=cfg),
    )
    nas = module(
        "tensorrt_llm.models.nemotron_nas",
        config=module("tensorrt_llm.models.nemotron_nas.config", DeciConfig=cfg),
    )
    models = module(
        "tensorrt_llm.models",
        gpt=gpt,
        llama=llama,
        falcon=falcon,
        nemotron_nas=nas,
        GemmaConfig=cfg,
    )
    module(
        "tensorrt_llm",
        __version__="0.0.0-stand-in",
        Mapping=_Mapping,
        models=models,
        _utils=module(
            "tensorrt_llm._utils",
            pad_vocab_size=_pad_vocab_size,
            str_dtype_to_torch=_str_dtype_to_torch,
        ),
        functional=module("tensorrt_llm.functional", non_gated_version=_non_gated_version),
        layers=module("tensorrt_llm.layers", MoeConfig=moe_config),
    )


def _model_file(root: Path) -> Path:
    it = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    it_dir = root / ("release" if it == "release" else f"iter_{int(it):07d}")
    return it_dir / "mp_rank_00" / "model_optim_rng.pt"


def _transformer_config(args: argparse.Namespace) -> Any:
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        params_dtype=args.params_dtype,
        bf16=args.bf16,
    )


def convert(source: Path, output: Path, tp: int) -> dict[str, float]:
    """Run the exporter path; returns seconds per phase."""
    install_tensorrt_llm_stand_ins()
    from megatron.core.export.data_type import DataType
    from megatron.core.export.export_config import ExportConfig
    from megatron.core.export.model_type import ModelType
    from megatron.core.export.trtllm.trtllm_helper import TRTLLMHelper
    from safetensors.torch import save_file

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(_model_file(source), map_location="cpu", weights_only=True)
    args, state_dict = ckpt["args"], ckpt["model"]
    del ckpt
    times["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    helper = TRTLLMHelper(
        transformer_config=_transformer_config(args),
        model_type=ModelType.llama,
        position_embedding_type=args.position_embedding_type,
        max_position_embeddings=args.max_position_embeddings,
        rotary_percentage=args.rotary_percent,
        rotary_base=args.rotary_base,
        activation="swiglu" if args.swiglu else "gelu",
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )
    dtype = {torch.bfloat16: DataType.bfloat16, torch.float16: DataType.float16}.get(
        args.params_dtype, DataType.float32
    )
    weights_list, configs = helper.get_trtllm_pretrained_config_and_model_weights(
        model_state_dict=state_dict,
        dtype=dtype,
        export_config=ExportConfig(inference_tp_size=tp, use_parallel_embedding=False),
        on_device_distributed_conversion=False,
    )
    times["convert"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    for rank, weights in enumerate(weights_list):
        save_file(weights, str(output / f"rank{rank}.safetensors"))
    (output / "config.json").write_text(json.dumps(configs[0].to_dict(), indent=2, default=str))
    times["save"] = time.perf_counter() - t0
    return times


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="legacy checkpoint root (TP=1, PP=1)")
    ap.add_argument("output", type=Path)
    ap.add_argument("--tp", type=int, required=True)
    a = ap.parse_args(argv)
    times = convert(a.source, a.output, a.tp)
    print(json.dumps({"phase_seconds": times}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
