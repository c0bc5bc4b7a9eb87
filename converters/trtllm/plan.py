"""Which tensors each TensorRT-LLM rank holds, and from which source slices (spec §2).

`rank_tensors` only builds lazy expressions: shapes and byte counts are known before any data is
read, so the same plan answers "how much will rank r read, write and hold" and drives the writer.
"""

from __future__ import annotations

from dataclasses import dataclass

from converters.choices import NONFINITE_POLICIES
from converters.dtypes import DType
from converters.errors import ConversionError, IncompatibleParallelism, UnsupportedModel
from converters.megatron.layout import SourceCheckpoint
from converters.model import DTYPES, ModelConfig
from converters.tensors import Concat, LazyTensor, Zeros
from converters.trtllm import moe, reshard
from converters.trtllm.families import family_for
from converters.trtllm.families.base import Biases


@dataclass(frozen=True)
class Target:
    """The TensorRT-LLM layout to produce."""

    tp: int
    pp: int = 1
    dtype: str | None = None  # None: keep the checkpoint's dtype
    parallel_embedding: bool = False
    # Mixture of experts: the target TP group split as moe_tp = tp / moe_ep experts-TP ranks by
    # moe_ep expert-parallel ranks (TensorRT-LLM `Mapping`; 1 = every rank holds every expert).
    moe_ep: int = 1
    # NaN/infinite weights: "warn" lists them in the rank result, "error" fails the rank.
    nonfinite: str = "warn"

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def output_dtype(self, cfg: ModelConfig) -> str:
        return self.dtype or cfg.dtype


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of a rank file: its name and the lazy source slice it is made of."""

    name: str
    source: LazyTensor
    add_one: bool = False  # zero-centred norm weights (apply_layernorm_1p) are stored as gamma - 1
    dtype: str | None = None  # None: the target's dtype (the MoE router is always float32)

    def output_dtype(self, default: DType) -> DType:
        """The dtype this tensor is written in when the target writes `default`."""
        return DTYPES[self.dtype] if self.dtype else default


@dataclass(frozen=True)
class RankEstimate:
    """What converting one rank costs, computed from shapes alone."""

    rank: int
    tensors: int
    bytes_read: int
    bytes_written: int
    peak_bytes: int  # the largest (source slice + converted tensor) held at once
    experts: int = 0  # MoE: (layer, expert) weights this rank holds


def unsupported_features(cfg: ModelConfig) -> list[str]:
    """What Porter reads from Megatron but does not write for TensorRT-LLM yet (the merge
    planner below handles them; the Hugging Face target writes them)."""
    found: list[str] = []  # qk-layernorm and RoPE scaling: the families say (Qwen3, Llama 3.x)
    return found


def check_features(cfg: ModelConfig) -> None:
    """Raise `UnsupportedModel` naming each feature of `cfg` the TensorRT-LLM target lacks."""
    found = unsupported_features(cfg)
    if found:
        raise UnsupportedModel(
            f"{' and '.join(found)} is not supported by the TensorRT-LLM target yet "
            "(the Hugging Face layout, megatron-hf, supports it)"
        )


def check_target(cfg: ModelConfig, target: Target) -> None:
    """Raise `IncompatibleParallelism` unless `cfg` can be laid out as `target` (and
    `UnsupportedModel` for a feature the TensorRT-LLM target does not write)."""
    check_features(cfg)
    if target.tp < 1 or target.pp < 1:
        raise IncompatibleParallelism(
            f"TP and PP must be at least 1 (got TP={target.tp}, PP={target.pp})"
        )
    if target.dtype is not None and target.dtype not in DTYPES:
        raise IncompatibleParallelism(f"dtype {target.dtype!r} is not one of {', '.join(DTYPES)}")
    if target.nonfinite not in NONFINITE_POLICIES:
        raise ConversionError(
            f"nonfinite {target.nonfinite!r} is not one of {', '.join(NONFINITE_POLICIES)}"
        )
    reshard.check_attention_split(cfg, target.tp)
    moe.check_moe_split(cfg, target.tp, target.moe_ep)
    dense_mlp = not cfg.is_moe or bool(cfg.moe_layer_pattern)
    for name, size in (("ffn_hidden_size", cfg.ffn_hidden_size if dense_mlp else 0),):
        if size % target.tp:
            raise IncompatibleParallelism(
                f"{name}={size} is not divisible by the target TP={target.tp}"
            )
    if cfg.num_layers % target.pp:
        raise IncompatibleParallelism(
            f"num_layers={cfg.num_layers} is not divisible by the target PP={target.pp}"
        )


def stage_layers(cfg: ModelConfig, target: Target, pp_rank: int) -> range:
    """Global layer numbers held by pipeline stage `pp_rank`."""
    per_stage = cfg.num_layers // target.pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _biases(cfg: ModelConfig, merged: bool) -> Biases:
    """The bias tensors the TensorRT-LLM family of `cfg` has. The merge planner, for a MoE model
    no TensorRT-LLM family takes (other targets write it), plans the biases the source has."""
    try:
        return family_for(cfg).biases(cfg)
    except UnsupportedModel:
        if not (merged and cfg.is_moe):
            raise
        linear = cfg.add_bias_linear
        return Biases(qkv=cfg.add_qkv_bias or linear, dense=linear, mlp=linear)


class _RankPlanner:
    """Builds the output tensors of one rank (a small helper object to keep the rules readable)."""

    def __init__(
        self, source: SourceCheckpoint, target: Target, rank: int, merged: bool = False
    ) -> None:
        self.source, self.cfg, self.target = source, source.config, target
        self.biases = _biases(self.cfg, merged)
        self.tp_rank, self.pp_rank = rank % target.tp, rank // target.tp
        self.out: list[OutputTensor] = []

    def add(
        self, name: str, tensor: LazyTensor, add_one: bool = False, dtype: str | None = None
    ) -> None:
        self.out.append(OutputTensor(name, tensor, add_one, dtype))

    def split(self, tensor: LazyTensor, dim: int) -> LazyTensor:
        return reshard.split(tensor, dim, self.tp_rank, self.target.tp)

    def optional_bias(self, name: str, rows: int) -> LazyTensor:
        """The source bias, or zeros when the source model has none but the target expects one."""
        if self.source.has(name):
            return self.source.tensor(name)
        return Zeros((rows,), self.cfg.element_type)

    def norm(self, out_prefix: str, src_prefix: str) -> None:
        one_p = self.cfg.apply_layernorm_1p
        self.add(f"{out_prefix}.weight", self.source.tensor(f"{src_prefix}.weight"), add_one=one_p)
        if self.cfg.normalization == "LayerNorm":
            self.add(f"{out_prefix}.bias", self.source.tensor(f"{src_prefix}.bias"))

    def embeddings(self) -> None:
        parallel = self.target.parallel_embedding
        tp_rank, tp = self.tp_rank, self.target.tp
        words = self.source.tensor("embedding.word_embeddings.weight")
        self.add(
            "transformer.vocab_embedding.weight",
            reshard.split_padded_rows(words, tp_rank, tp) if parallel else words,
        )
        if self.cfg.position_embedding_type == "learned_absolute":
            positions = self.source.tensor("embedding.position_embeddings.weight")
            self.add(
                "transformer.position_embedding.weight",
                reshard.split_padded_rows(positions, tp_rank, tp) if parallel else positions,
            )

    def layer(self, layer: int, local: int) -> None:
        cfg, biases = self.cfg, self.biases
        src, out = f"decoder.layers.{layer}", f"transformer.layers.{local}"
        self.norm(f"{out}.input_layernorm", f"{src}.input_layernorm")
        qkv = self.source.tensor(f"{src}.self_attention.linear_qkv.weight")
        self.add(
            f"{out}.attention.qkv.weight",
            reshard.qkv_for_rank(qkv, cfg, self.tp_rank, self.target.tp),
        )
        if biases.qkv:
            qkv_bias = self.optional_bias(f"{src}.self_attention.linear_qkv.bias", cfg.qkv_rows)
            self.add(
                f"{out}.attention.qkv.bias",
                reshard.qkv_for_rank(qkv_bias, cfg, self.tp_rank, self.target.tp),
            )
        self.qk_norms(src, out)
        proj = self.source.tensor(f"{src}.self_attention.linear_proj.weight")
        self.add(f"{out}.attention.dense.weight", self.split(proj, 1))
        if biases.dense:
            self.add(
                f"{out}.attention.dense.bias",
                self.optional_bias(f"{src}.self_attention.linear_proj.bias", cfg.hidden_size),
            )
        self.norm(f"{out}.post_layernorm", f"{src}.pre_mlp_layernorm")
        if cfg.is_moe_layer(layer):
            for name, tensor, dtype in moe.moe_layer_tensors(
                self.source, layer, out, self.tp_rank, self.target.tp, self.target.moe_ep
            ):
                self.add(name, tensor, dtype=dtype)
        else:
            self.mlp(src, out, biases.mlp)

    def qk_norms(self, src: str, out: str) -> None:
        """Per-head query/key norms (one weight of size d each, whole on every rank)."""
        norms = ("q_layernorm", "k_layernorm")
        if self.cfg.qk_layernorm:
            for norm in norms:
                self.norm(f"{out}.attention.{norm}", f"{src}.self_attention.{norm}")
            return
        stored = [n for n in norms if self.source.has(f"{src}.self_attention.{n}.weight")]
        if stored:  # converting without them would silently compute another model
            raise UnsupportedModel(
                f"{src}.self_attention.{stored[0]}.weight is stored but `args.qk_layernorm` is "
                "not set: the checkpoint and its arguments disagree",
                self.source.path,
            )

    def mlp(self, src: str, out: str, bias: bool) -> None:
        cfg = self.cfg
        fc1 = self.source.tensor(f"{src}.mlp.linear_fc1.weight")
        fc1_bias = self.optional_bias(f"{src}.mlp.linear_fc1.bias", cfg.fc1_rows) if bias else None
        if cfg.gated_mlp:
            fc, gate = reshard.gated_halves(fc1)
            self.add(f"{out}.mlp.fc.weight", self.split(fc, 0))
            self.add(f"{out}.mlp.gate.weight", self.split(gate, 0))
            if fc1_bias is not None:
                fc_bias, gate_bias = reshard.gated_halves(fc1_bias)
                self.add(f"{out}.mlp.fc.bias", self.split(fc_bias, 0))
                self.add(f"{out}.mlp.gate.bias", self.split(gate_bias, 0))
        else:
            self.add(f"{out}.mlp.fc.weight", self.split(fc1, 0))
            if fc1_bias is not None:
                self.add(f"{out}.mlp.fc.bias", self.split(fc1_bias, 0))
        fc2 = self.source.tensor(f"{src}.mlp.linear_fc2.weight")
        self.add(f"{out}.mlp.proj.weight", self.split(fc2, 1))
        if bias:
            self.add(
                f"{out}.mlp.proj.bias",
                self.optional_bias(f"{src}.mlp.linear_fc2.bias", cfg.hidden_size),
            )

    def head(self) -> None:
        self.norm("transformer.ln_f", "decoder.final_layernorm")
        name = (
            "embedding.word_embeddings.weight"
            if self.cfg.tied_embeddings
            else "output_layer.weight"
        )
        lm_head = self.source.tensor(name)
        self.add("lm_head.weight", reshard.split_padded_rows(lm_head, self.tp_rank, self.target.tp))

    def build(self) -> list[OutputTensor]:
        if self.pp_rank == 0:
            self.embeddings()
        layers = stage_layers(self.cfg, self.target, self.pp_rank)
        for local, layer in enumerate(layers):
            self.layer(layer, local)
        if self.pp_rank == self.target.pp - 1:
            self.head()
        return self.out


def rank_tensors(source: SourceCheckpoint, target: Target, rank: int) -> list[OutputTensor]:
    """The tensors of TensorRT-LLM rank `rank` (= pp_rank · TP + tp_rank), in file order."""
    check_target(source.config, target)
    if not 0 <= rank < target.world_size:
        raise IncompatibleParallelism(f"rank {rank} is outside 0..{target.world_size - 1}")
    return _RankPlanner(source, target, rank).build()


def merged_tensors(source: SourceCheckpoint) -> list[OutputTensor]:
    """Every tensor merged over the source's TP and PP ranks, in model order, under TensorRT-LLM's
    names (TP=1, PP=1), including what the TensorRT-LLM target refuses (`unsupported_features`):
    the base other targets rename (converters.hf.plan)."""
    return _RankPlanner(source, Target(tp=1), 0, merged=True).build()


def estimate_rank(source: SourceCheckpoint, target: Target, rank: int) -> RankEstimate:
    """Bytes read, written and held at peak when converting rank `rank` (no data is read)."""
    tensors = rank_tensors(source, target, rank)
    dtype = DTYPES[target.output_dtype(source.config)]

    def written(tensor: LazyTensor, out: OutputTensor) -> int:
        return tensor.nbytes // tensor.dtype.itemsize * out.output_dtype(dtype).itemsize

    # The writer holds one piece at a time: one part of a row-wise join (a TP shard of a merged
    # embedding, one expert of a stacked MoE weight), else the whole tensor.
    pieces = [
        (part, t)
        for t in tensors
        for part in (
            t.source.parts if isinstance(t.source, Concat) and t.source.dim == 0 else [t.source]
        )
    ]
    return RankEstimate(
        rank=rank,
        tensors=len(tensors),
        bytes_read=sum(t.source.source_nbytes for t in tensors),
        bytes_written=sum(written(t.source, t) for t in tensors),
        peak_bytes=max(part.nbytes + written(part, t) for part, t in pieces),
        experts=_rank_expert_count(source.config, target, rank),
    )


def _rank_expert_count(cfg: ModelConfig, target: Target, rank: int) -> int:
    if not cfg.is_moe:
        return 0
    layers = stage_layers(cfg, target, rank // target.tp)
    moe_layers = sum(cfg.is_moe_layer(layer) for layer in layers)
    return moe_layers * len(moe.rank_experts(cfg, rank % target.tp, target.moe_ep))
