"""Which tensors a Hugging Face checkpoint holds, under which names, in which shard file.

HF checkpoints are unsharded by tensor parallelism: every tensor is the merge of the source's TP
shards. The TensorRT-LLM merge planner (`merged_tensors`: its TP=1, PP=1 plan, without that
target's feature refusals) already yields exactly those merged tensors, lazily and in model order
(QKV de-interleaved into [Q; K; V], the gated fc1 split into its halves, q/k norms whole), so this
module only renames them, splits QKV into q/k/v, trims the vocab if asked, and assigns them to
shard files. Nothing is read here: shapes and byte counts come from the lazy tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from converters.errors import ConversionError, UnsupportedModel
from converters.hf.families import HfFamily, family_for
from converters.megatron.layout import SourceCheckpoint
from converters.megatron.names import expert_name, layer_name
from converters.model import DTYPES, ModelConfig
from converters.tensors import Zeros
from converters.trtllm.plan import NONFINITE_POLICIES, OutputTensor, merged_tensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# TensorRT-LLM layer tensor → HF layer tensor. Megatron's gated MLP computes act(y1) · y2 with
# [y1; y2] = linear_fc1(x); TRT-LLM's `fc` is y1 (activated) and its `gate` is y2 (the multiplier),
# while HF computes down(act(gate_proj(x)) · up_proj(x)): fc → gate_proj, gate → up_proj.
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "attention.dense.weight": "self_attn.o_proj.weight",
    "attention.dense.bias": "self_attn.o_proj.bias",
    "post_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.fc.weight": "mlp.gate_proj.weight",
    "mlp.fc.bias": "mlp.gate_proj.bias",
    "mlp.gate.weight": "mlp.up_proj.weight",
    "mlp.gate.bias": "mlp.up_proj.bias",
    "mlp.proj.weight": "mlp.down_proj.weight",
    "mlp.proj.bias": "mlp.down_proj.bias",
}
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class HfTarget:
    """The Hugging Face layout to produce."""

    dtype: str | None = None  # None: keep the checkpoint's dtype
    max_shard_bytes: int = 5 * 10**9  # save_pretrained's default "5GB"
    vocab_size: int | None = None  # None: keep Megatron's padded rows; N: the first N rows
    architecture: str | None = None  # None: the one architecture that represents the model
    nonfinite: str = "warn"  # NaN/infinite weights: "warn" lists them, "error" fails the shard

    def output_dtype(self, cfg: ModelConfig) -> str:
        return self.dtype or cfg.dtype

    def output_vocab(self, cfg: ModelConfig) -> int:
        return self.vocab_size or cfg.vocab_size


@dataclass(frozen=True)
class ShardPlan:
    """One shard file: its tensors ({name: output bytes}, in file order) and what writing it costs."""

    index: int
    file: str
    tensors: dict[str, int]
    bytes_read: int
    bytes_written: int  # tensor data in the output dtype (the file adds a small JSON header)
    peak_bytes: int  # the largest (source tensor + converted copy) held at once


def check_target(cfg: ModelConfig, target: HfTarget) -> None:
    """Raise a `ConversionError` unless `cfg` can be written as `target` (shard sizes aside)."""
    if target.dtype is not None and target.dtype not in DTYPES:
        raise ConversionError(f"dtype {target.dtype!r} is not one of {', '.join(DTYPES)}")
    if target.nonfinite not in NONFINITE_POLICIES:
        raise ConversionError(
            f"nonfinite {target.nonfinite!r} is not one of {', '.join(NONFINITE_POLICIES)}"
        )
    if target.max_shard_bytes < 1:
        raise ConversionError(f"max_shard_bytes must be positive, got {target.max_shard_bytes}")
    if target.vocab_size is not None and not 1 <= target.vocab_size <= cfg.vocab_size:
        raise ConversionError(
            f"vocab_size={target.vocab_size} must be between 1 and the checkpoint's "
            f"{cfg.vocab_size} vocab rows (it can trim Megatron's padding, not add rows)"
        )
    family_for(cfg, target.architecture)


def _split_qkv(
    tensor: OutputTensor, prefix: str, cfg: ModelConfig, kind: str
) -> list[OutputTensor]:
    """q/k/v_proj.{kind} from TRT-LLM's unsharded [Q rows of all heads; K; V] (weight or bias)."""
    q_rows = cfg.num_attention_heads * cfg.kv_channels
    kv_rows = cfg.num_query_groups * cfg.kv_channels
    starts = {"q": (0, q_rows), "k": (q_rows, kv_rows), "v": (q_rows + kv_rows, kv_rows)}
    return [
        OutputTensor(f"{prefix}.self_attn.{p}_proj.{kind}", tensor.source.narrow(0, start, rows))
        for p, (start, rows) in starts.items()
    ]


def _rename(
    tensor: OutputTensor, cfg: ModelConfig, family: type[HfFamily], vocab: int
) -> list[OutputTensor]:
    """The HF tensors made from one TensorRT-LLM tensor (none, one, or q/k/v)."""
    name = tensor.name
    if name in ("transformer.vocab_embedding.weight", "lm_head.weight"):
        if name == "lm_head.weight" and cfg.tied_embeddings:
            return []  # tie_word_embeddings: transformers reuses model.embed_tokens.weight
        rows = (
            tensor.source.narrow(0, 0, vocab) if vocab != tensor.source.shape[0] else tensor.source
        )
        hf = "model.embed_tokens.weight" if name.startswith("transformer.") else name
        return [OutputTensor(hf, rows)]
    if name == "transformer.ln_f.weight":
        return [OutputTensor("model.norm.weight", tensor.source, _add_one(tensor, family))]
    match = _LAYER.match(name)
    if not match:
        raise UnsupportedModel(f"{name} has no Hugging Face counterpart in {family.architecture}")
    prefix, rest = f"model.layers.{match.group(1)}", match.group(2)
    if rest in ("attention.qkv.weight", "attention.qkv.bias"):
        return _split_qkv(tensor, prefix, cfg, rest.rsplit(".", 1)[1])
    if rest == "attention.dense.bias" and not family.o_proj_bias(cfg):
        if not isinstance(tensor.source, Zeros):
            raise UnsupportedModel(
                f"the checkpoint has an attention output bias, which {family.architecture} lacks"
            )
        return []  # the zeros TensorRT-LLM's Llama wants for a model without one
    if rest not in _LAYER_NAMES:
        raise UnsupportedModel(f"{name} has no Hugging Face counterpart in {family.architecture}")
    return [OutputTensor(f"{prefix}.{_LAYER_NAMES[rest]}", tensor.source, _add_one(tensor, family))]


def _add_one(tensor: OutputTensor, family: type[HfFamily]) -> bool:
    """Whether a zero-centred norm weight gets its `+1` (not where the model computes `1 + w`)."""
    return tensor.add_one and not family.zero_centred_norms


def _moe_block(source: SourceCheckpoint, family: type[HfFamily], layer: int) -> list[OutputTensor]:
    """The router and every routed expert of MoE layer `layer`, one tensor per expert weight, read
    from the source's merged experts (Megatron's fc1 is [gate; up])."""
    cfg, names = source.config, family.moe_names
    assert names is not None  # family_for gave an MoE architecture to an MoE model
    prefix = f"model.layers.{layer}.{names.block}"
    router = source.tensor(layer_name(layer, "mlp.router.weight"))
    out = [OutputTensor(f"{prefix}.{names.router}.weight", router)]
    rows = cfg.expert_ffn_hidden_size
    for expert in range(cfg.num_experts):
        fc1 = source.tensor(expert_name(layer, expert, "linear_fc1.weight"))
        fc2 = source.tensor(expert_name(layer, expert, "linear_fc2.weight"))
        at = f"{prefix}.experts.{expert}"
        out += [
            OutputTensor(f"{at}.{names.gate}.weight", fc1.narrow(0, 0, rows)),
            OutputTensor(f"{at}.{names.up}.weight", fc1.narrow(0, rows, rows)),
            OutputTensor(f"{at}.{names.down}.weight", fc2),
        ]
    return out


def _moe_layer(name: str, cfg: ModelConfig) -> int | None:
    """The layer of a TensorRT-LLM MLP tensor in an MoE layer (which the HF plan replaces with
    its own router and per-expert tensors), None for any other tensor."""
    match = _LAYER.match(name)
    if match and match.group(2).startswith("mlp.") and cfg.is_moe_layer(int(match.group(1))):
        return int(match.group(1))
    return None


def hf_tensors(source: SourceCheckpoint, target: HfTarget) -> list[OutputTensor]:
    """Every tensor of the HF checkpoint, with HF names, in model order (lazy: nothing is read)."""
    cfg = source.config
    check_target(cfg, target)
    family = family_for(cfg, target.architecture)
    vocab = target.output_vocab(cfg)
    out: list[OutputTensor] = []
    moe_done: set[int] = set()
    for tensor in merged_tensors(source):
        layer = _moe_layer(tensor.name, cfg)
        if layer is None:
            out += _rename(tensor, cfg, family, vocab)
        elif layer not in moe_done:
            out += _moe_block(source, family, layer)
            moe_done.add(layer)
    return out


def shard_file_name(index: int, count: int) -> str:
    """`model.safetensors` alone, else `model-00001-of-00003.safetensors` (as transformers names them)."""
    return SINGLE_FILE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def output_bytes(tensor: OutputTensor, dtype: str) -> int:
    """Bytes of `tensor` once converted to `dtype`."""
    return tensor.source.nbytes // tensor.source.dtype.itemsize * DTYPES[dtype].itemsize


def _groups(tensors: list[OutputTensor], limit: int, dtype: str) -> list[list[OutputTensor]]:
    """Tensors in model order, a new group whenever the next one would push a group past `limit`.

    A tensor larger than `limit` is refused (naming the largest): `save_pretrained` would put it
    alone in a shard larger than the limit, but a limit here is a promise about file sizes (a
    filesystem or object-store cap, a download size), so the conversion stops and says what fits."""
    sizes = [output_bytes(t, dtype) for t in tensors]
    largest = max(range(len(tensors)), key=sizes.__getitem__)
    if sizes[largest] > limit:
        raise ConversionError(
            f"{tensors[largest].name} alone is {sizes[largest]} bytes as {dtype}, more than the "
            f"largest shard allowed ({limit} bytes); raise the maximum shard size (--max-shard-size) to at least "
            f"{sizes[largest]}"
        )
    groups: list[list[OutputTensor]] = []
    size = 0
    for tensor, nbytes in zip(tensors, sizes, strict=True):
        if not groups or size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += nbytes
    return groups


def shard_tensors(source: SourceCheckpoint, target: HfTarget) -> list[list[OutputTensor]]:
    """The tensors of each shard file, in file order."""
    tensors = hf_tensors(source, target)
    return _groups(tensors, target.max_shard_bytes, target.output_dtype(source.config))


def _plan(index: int, count: int, tensors: list[OutputTensor], dtype: str) -> ShardPlan:
    written = [output_bytes(t, dtype) for t in tensors]
    return ShardPlan(
        index=index,
        file=shard_file_name(index, count),
        tensors={t.name: w for t, w in zip(tensors, written, strict=True)},
        bytes_read=sum(t.source.source_nbytes for t in tensors),
        bytes_written=sum(written),
        peak_bytes=max(t.source.nbytes + w for t, w in zip(tensors, written, strict=True)),
    )


def plan_shards(source: SourceCheckpoint, target: HfTarget) -> list[ShardPlan]:
    """Every shard file of `target`: tensors assigned in model order up to `max_shard_bytes` of
    output (converted) bytes per file. No data is read."""
    groups = shard_tensors(source, target)
    dtype = target.output_dtype(source.config)
    return [_plan(i, len(groups), group, dtype) for i, group in enumerate(groups)]
