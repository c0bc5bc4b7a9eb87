"""`porter verify` on real exports of real Megatron checkpoints: the reference layers reproduce
megatron-core's own logits; every fixture family and layout verifies clean for both targets; seeded
defects are caught and located (layer, part, tensor); bad input is refused with a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.megatron.example import Layout
from converters.megatron.layout import open_checkpoint
from converters.verify import verify_export
from converters.verify.files import BadExport
from converters.verify.model_math import ExportMismatch
from converters.verify.run import forward_logits
from converters.verify.source import MegatronSide
from tasks.executors.local import run_conversion
from tasks.kinds.megatron_hf import HfSpec
from tasks.kinds.megatron_trtllm import ConvertSpec
from tests.conftest import HF_LAYOUTS, LAYOUTS

TP2 = Layout("legacy", 2, 1)
TP1 = Layout("legacy", 1, 1)
HF_FAMILIES = ("llama31", "qwen2", "qwen3")


@pytest.fixture(scope="module")
def export(megatron, tmp_path_factory):
    """`export(fixture, layout, target, **options)` → (source path, export directory), converted
    once per module (`target`: "trtllm" or "hf")."""
    made: dict[tuple, tuple[Path, Path]] = {}

    def get(fixture: str, layout: Layout, target: str, **options):
        key = (fixture, layout, target, tuple(sorted(options.items())))
        if key not in made:
            source = megatron(fixture).paths[layout]
            out = tmp_path_factory.mktemp(f"{target}-{fixture}") / "export"
            spec = ConvertSpec if target == "trtllm" else HfSpec
            run_conversion(spec(str(source), str(out), **options), workers=1)
            made[key] = (source, out)
        return made[key]

    return get


def run(source: Path, export_dir: Path, **options):
    return verify_export(open_checkpoint(source), export_dir, **options)


def copy(export_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(export_dir, target)
    return target


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def edit_config(directory: Path, change) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


# ── the reference layers are right ────────────────────────────────────────────────────────────


DENSE = ["llama", "gpt", "llama31", "qwen2", "qwen3", "llama_te_bf16", "qwen3_1p", "starcoder"]
MOE = ["mixtral", "mixtral_presoftmax", "mixtral_legacy_grouped", "qwen3_moe", "moe_mixed_shared"]


@pytest.mark.parametrize("fixture", DENSE + MOE)
def test_reference_layers_reproduce_megatron_logits(megatron, fixture):
    """The source side alone, run forward, gives megatron-core's own logits in every layout:
    the reference the exports are judged by is Megatron's arithmetic."""
    checkpoints = megatron(fixture)
    for layout, path in checkpoints.paths.items():
        logits = forward_logits(MegatronSide(open_checkpoint(path)), checkpoints.tokens)
        diff = (logits - checkpoints.logits.float()).abs().max().item()
        assert diff < (2e-2 if fixture.endswith("bf16") else 1e-4), (layout, diff)


# ── clean exports verify clean ────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.dirname)
@pytest.mark.parametrize("fixture", ["llama", "gpt"])
def test_trtllm_exports_verify_clean(export, fixture, layout):
    source, out = export(fixture, layout, "trtllm", tp=2)
    report = run(source, out)
    assert report.ok, report.failure()
    assert [s.label for s in report.stages] == [
        "embedding",
        *(f"layer {i}" for i in range(4)),
        "final norm + logits",
    ]
    assert report.tolerance == 1e-4 and max(s.relative for s in report.stages) < 1e-5


@pytest.mark.parametrize(
    "fixture, options",
    [
        ("llama", {"tp": 1}),
        ("llama", {"tp": 4}),  # 2 KV heads over 4 ranks: each KV head on two ranks
        ("llama", {"tp": 2, "pp": 2}),
        ("gpt", {"tp": 2, "parallel_embedding": True}),
        ("llama_te_bf16", {"tp": 2}),  # bf16 source and export: the same values, exact tolerance
    ],
    ids=["tp1", "tp4-kv-repeated", "tp2-pp2", "gpt-parallel-embedding", "bf16"],
)
def test_trtllm_layouts_verify_clean(export, fixture, options):
    layout = TP2 if fixture != "llama_te_bf16" else Layout("legacy", 2, 1)
    source, out = export(fixture, layout, "trtllm", **options)
    report = run(source, out)
    assert report.ok, report.failure()
    assert report.tolerance == 1e-4


@pytest.mark.parametrize(
    "fixture, layout, tp",
    [
        ("llama31", TP2, 2),
        ("qwen2", HF_LAYOUTS[3], 2),
        ("qwen3", TP2, 4),
        ("qwen3_1p", TP2, 2),  # zero-centred norm weights
        ("starcoder", TP1, 2),  # multi-query: the one KV head on every rank
    ],
    ids=["llama31", "qwen2-dist", "qwen3-tp4", "qwen3-1p", "starcoder"],
)
def test_trtllm_families_verify_clean(export, fixture, layout, tp):
    source, out = export(fixture, layout, "trtllm", tp=tp)
    report = run(source, out)
    assert report.ok, report.failure()


def test_bf16_export_of_fp32_source_verifies_with_the_dtype_tolerance(export):
    source, out = export("llama", TP2, "trtllm", tp=2, dtype="bfloat16")
    report = run(source, out)
    assert report.ok, report.failure()
    assert report.tolerance == 3e-2  # derived from bf16 rounding
    assert max(s.relative for s in report.stages) > 1e-4  # it really was rounded
    strict = run(source, out, tolerance=1e-6)  # --tolerance overrides
    assert not strict.ok


@pytest.mark.parametrize("layout", HF_LAYOUTS, ids=lambda layout: layout.dirname)
@pytest.mark.parametrize("fixture", HF_FAMILIES)
def test_hf_exports_verify_clean(export, fixture, layout):
    source, out = export(fixture, layout, "hf")
    report = run(source, out)
    assert report.ok, report.failure()
    assert report.stages[-1].parts[-1].relative < 1e-5


@pytest.mark.parametrize(
    "fixture, options",
    [("llama", {}), ("llama_te_bf16", {}), ("qwen2", {"vocab_size": 90}), ("qwen3_1p", {})],
    ids=["llama", "bf16", "trimmed-vocab", "zero-centred-norms"],
)
def test_hf_variants_verify_clean(export, fixture, options):
    source, out = export(fixture, TP2, "hf", **options)
    report = run(source, out)
    assert report.ok, report.failure()
    if options:
        assert report.stages[-1].parts[-1].part == "logits" and max(report.tokens) < 90


MOE_HF = [
    ("mixtral", Layout("legacy", 2, 1, 2)),
    ("mixtral", Layout("legacy", 1, 2)),
    ("mixtral", Layout("torch_dist", 2, 1, 2)),
    ("mixtral_te_grouped", Layout("legacy", 2, 1, 2)),
    ("mixtral_legacy_grouped", Layout("legacy", 2, 1, 2)),
    ("qwen3_moe", Layout("legacy", 2, 1, 2)),
]


@pytest.mark.parametrize("fixture, layout", MOE_HF, ids=lambda v: getattr(v, "dirname", v))
def test_hf_moe_exports_verify_clean(export, fixture, layout):
    source, out = export(fixture, layout, "hf")
    report = run(source, out)
    assert report.ok, report.failure()
    assert max(s.relative for s in report.stages) < 1e-5


@pytest.mark.parametrize(
    "fixture, layout, options",
    [
        ("mixtral", Layout("legacy", 2, 1, 2), {"tp": 2}),
        ("mixtral", Layout("torch_dist", 2, 1, 2), {"tp": 2, "moe_ep": 2}),
        ("mixtral", Layout("legacy", 1, 2), {"tp": 4, "moe_ep": 2, "pp": 2}),
        ("mixtral_presoftmax", Layout("legacy", 2, 1, 2), {"tp": 2, "moe_ep": 2}),
    ],
    ids=["tp2", "dist-ep2", "tp4-ep2-pp2", "presoftmax"],
)
def test_trtllm_moe_exports_verify_clean(export, fixture, layout, options):
    source, out = export(fixture, layout, "trtllm", **options)
    report = run(source, out)
    assert report.ok, report.failure()


# ── seeded defects are caught and located ─────────────────────────────────────────────────────


def test_swapped_gate_and_up_in_one_rank_file(export, tmp_path):
    source, out = export("llama", TP2, "trtllm", tp=2)
    bad = copy(out, tmp_path)

    def swap(t):
        name = "transformer.layers.1.mlp.{}.weight"
        t[name.format("fc")], t[name.format("gate")] = t[name.format("gate")], t[name.format("fc")]

    edit_tensors(bad / "rank1.safetensors", swap)
    report = run(source, bad)
    failure = report.failure()
    assert not report.ok and failure.startswith("layer 1 (transformer.layers.1 in rank0..rank1")
    assert "MLP differs" in failure and "first differing: gate" in failure
    assert "transformer.layers.1.mlp.fc.weight" in failure and "worst on tp rank 1" in failure
    assert [s.ok for s in report.stages] == [True, True, False, True, True, True]


def test_swapped_kv_heads(export, tmp_path):
    source, out = export("llama", TP2, "trtllm", tp=1)
    bad = copy(out, tmp_path)
    d, q_rows = 8, 8 * 8  # head size, 8 query heads

    def swap(t):
        qkv = t["transformer.layers.2.attention.qkv.weight"]
        k0, k1 = qkv[q_rows : q_rows + d].clone(), qkv[q_rows + d : q_rows + 2 * d].clone()
        qkv[q_rows : q_rows + d], qkv[q_rows + d : q_rows + 2 * d] = k1, k0

    edit_tensors(bad / "rank0.safetensors", swap)
    failure = run(source, bad).failure()
    assert failure.startswith("layer 2 (transformer.layers.2 in rank0.safetensors): attention")
    assert "first differing: k " in failure and "attention.qkv.weight" in failure


def test_swapped_kv_heads_in_an_hf_export(export, tmp_path):
    source, out = export("qwen3", TP2, "hf")
    bad = copy(out, tmp_path)

    def swap(t):
        v = t["model.layers.0.self_attn.v_proj.weight"]
        t["model.layers.0.self_attn.v_proj.weight"] = torch.cat([v[16:32], v[:16], v[32:]])

    edit_tensors(bad / "model.safetensors", swap)
    failure = run(source, bad).failure()
    assert failure.startswith("layer 0 (model.layers.0): attention differs")
    assert "first differing: v (" in failure and "model.layers.0.self_attn.v_proj" in failure


def drop_rope_scaling(config: dict) -> None:
    """What an exporter that forgets Llama-3.1 scaling writes (both spellings transformers reads)."""
    config["rope_scaling"] = None
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}


def test_dropped_rope_scaling(export, tmp_path):
    source, out = export("llama31", TP2, "hf")
    bad = copy(out, tmp_path)
    edit_config(bad, drop_rope_scaling)
    failure = run(source, bad).failure()  # 16 tokens are enough to feel it
    assert failure.startswith("layer 0 (model.layers.0): attention differs")
    assert "first differing: q (normed, rotated)" in failure and "rotary settings" in failure


@pytest.mark.parametrize("target", ["trtllm", "hf"])
def test_transposed_output_projection(export, tmp_path, target):
    source, out = export("llama", TP2, target, **({"tp": 1} if target == "trtllm" else {}))
    bad = copy(out, tmp_path)
    file, name = {
        "trtllm": ("rank0.safetensors", "transformer.layers.3.attention.dense.weight"),
        "hf": ("model.safetensors", "model.layers.3.self_attn.o_proj.weight"),
    }[target]

    def transpose(t):
        t[name] = t[name].t().contiguous()  # 64 x 64: the shape cannot tell

    edit_tensors(bad / file, transpose)
    report = run(source, bad)
    failure = report.failure()
    assert failure.startswith("layer 3") and "attention differs" in failure
    assert f"output of {name}" in failure  # q, k, v and the attention itself agree
    assert report.stages[-1].ok  # the source's hidden states are carried forward


def test_pipeline_stage_layers_are_named_by_the_checkpoint_layer_number(export, tmp_path):
    source, out = export("llama", TP2, "trtllm", tp=1, pp=2)
    bad = copy(out, tmp_path)

    def scale(t):
        t["transformer.layers.0.mlp.proj.weight"] *= 1.01

    edit_tensors(bad / "rank1.safetensors", scale)
    failure = run(source, bad).failure()
    assert failure.startswith("layer 2 (transformer.layers.0 in rank1.safetensors): MLP differs")


def test_a_tensor_the_model_does_not_use_fails(export, tmp_path):
    source, out = export("qwen3", TP2, "hf")
    bad = copy(out, tmp_path)
    edit_tensors(bad / "model.safetensors", lambda t: t.update(extra=torch.zeros(3)))
    report = run(source, bad)
    assert all(s.ok for s in report.stages) and not report.ok
    assert report.failure() == "the export holds tensors the model does not use: extra"


def test_zeroed_expert(export, tmp_path):
    source, out = export("mixtral", Layout("legacy", 2, 1, 2), "hf")
    bad = copy(out, tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    edit_tensors(bad / "model.safetensors", lambda t: t[name].zero_())
    failure = run(source, bad).failure()
    assert failure.startswith("layer 1 (model.layers.1): MLP, expert 2 differs")
    assert "first differing: expert 2" in failure
    assert "model.layers.1.block_sparse_moe.experts.2" in failure


def test_zeroed_expert_in_a_trtllm_rank_file(export, tmp_path):
    source, out = export("mixtral", Layout("legacy", 2, 1, 2), "trtllm", tp=2, moe_ep=2)
    bad = copy(out, tmp_path)
    name = "transformer.layers.0.mlp.proj.weight"  # EP rank 1 holds experts 2 and 3
    edit_tensors(bad / "rank1.safetensors", lambda t: t[name][1].zero_())
    failure = run(source, bad).failure()
    assert failure.startswith("layer 0 (transformer.layers.0 in rank0..rank1.safetensors): MLP, ")
    assert "expert 3 differs" in failure and "[1] in rank(s) [1]" in failure


def test_an_expert_no_token_picks_is_still_compared(export, tmp_path):
    """Every expert runs on every token: one the router never picks for these tokens cannot move
    the layer's output, yet a wrong copy of it is found."""
    source, out = export("mixtral", Layout("legacy", 2, 1, 2), "hf")
    bad = copy(out, tmp_path)
    name = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    report = run(source, out, tokens=1)
    side = MegatronSide(open_checkpoint(source))
    with torch.no_grad():
        x = side.embed(torch.tensor(report.tokens)).output
        h = x + side.attention(0, x).output
        logits = side.mlp(0, h).trace["router"].value[0]
    unpicked = int(logits.argsort()[0])  # the lowest logit: not in the top 2
    edit_tensors(bad / "model.safetensors", lambda t: t[name.format(unpicked)].mul_(-1))
    broken = run(source, bad, tokens=1)
    assert broken.stages[1].parts[1].part == f"MLP, expert {unpicked}"
    assert not broken.ok


# ── bad input ─────────────────────────────────────────────────────────────────────────────────


def test_different_models_are_refused_naming_the_fields(export, megatron):
    _, out = export("llama", TP2, "trtllm", tp=2)
    with pytest.raises(ExportMismatch, match="different models \\(shape mismatch\\)") as caught:
        run(megatron("gpt").paths[TP2], out)
    message = str(caught.value)
    assert "groups 2 in the export, 8 in the source" in message
    assert "ffn 128 in the export, 256 in the source" in message and str(out) in message


def test_a_tensor_of_another_shape_is_named(export, tmp_path):
    source, out = export("qwen2", TP2, "hf")
    bad = copy(out, tmp_path)
    edit_tensors(
        bad / "model.safetensors",
        lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(64, 64)}),
    )
    with pytest.raises(BadExport, match=r"model.layers.1.mlp.up_proj.weight has shape \(64, 64\)"):
        run(source, bad)


def test_unfinished_export_is_refused(export, tmp_path):
    source, out = export("llama", TP2, "trtllm", tp=2)
    bad = copy(out, tmp_path)
    (bad / "manifest.json").unlink()
    with pytest.raises(BadExport, match=r"unfinished export: no manifest\.json"):
        run(source, bad)
    assert run(source, bad, finished=False).ok  # what the job step does before it publishes


def test_unknown_export_format_is_refused(megatron, tmp_path):
    source = megatron("llama").paths[TP2]
    with pytest.raises(BadExport, match=r"unknown export format: no config\.json"):
        run(source, tmp_path)
    (tmp_path / "config.json").write_text('{"model": "x"}')
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(BadExport, match=r"unknown export format: config\.json names neither"):
        run(source, tmp_path)
