"""Mixture-of-experts to the TensorRT-LLM checkpoint (Mixtral-style), checked by the rank-emulating
reference forward (tests/trtllm_reference_moe.py) against megatron-core's own logits.

The fixtures give every expert and router distinct weights large enough that routing matters:
a swapped gate/up, an expert on the wrong rank or the wrong normalisation mode moves the logits far
beyond the tolerance (test_the_fixture_feels_routing shows it for the last)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from converters.errors import IncompatibleParallelism
from converters.megatron import names
from converters.megatron.layout import open_checkpoint
from converters.torch_arrays import materialize as as_torch
from converters.trtllm.moe import check_moe_split
from converters.trtllm.plan import Target, estimate_rank
from tests.conftest import MOE_LAYOUTS, MOE_SMALL_LAYOUTS, read_json
from tests.test_bad_input import assert_failed_cleanly, rewrite, run_convert
from tests.test_conversion import assert_matches_megatron, convert
from tests.trtllm_reference import reference_logits

FELT = 1e-3  # ten times the tolerance
TARGETS = [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)]  # (tp, moe_ep)


@pytest.mark.parametrize(("tp", "moe_ep"), TARGETS, ids=lambda v: str(v))
def test_logits_match_megatron(megatron, tmp_path, tp, moe_ep):
    checkpoints = megatron("mixtral")
    source = checkpoints.paths[MOE_LAYOUTS[3]]  # legacy TP2 EP2
    output = convert(source, tmp_path / "out", tp=tp, moe_ep=moe_ep)
    assert_matches_megatron(output, checkpoints)
    config = read_json(output / "config.json")
    assert config["architecture"] == "MixtralForCausalLM" and config["hidden_act"] == "swiglu"
    assert config["moe"] == {"num_experts": 4, "top_k": 2, "normalization_mode": 1}
    assert config["intermediate_size"] == 48  # the expert FFN, not ffn_hidden_size (64)
    assert config["mapping"] == {
        "world_size": tp,
        "tp_size": tp,
        "pp_size": 1,
        "moe_tp_size": tp // moe_ep,
        "moe_ep_size": moe_ep,
    }


@pytest.mark.parametrize(
    ("fixture", "layout"),
    [("mixtral", layout) for layout in MOE_LAYOUTS]
    + [("mixtral_te_grouped", MOE_LAYOUTS[3]), ("mixtral_legacy_grouped", MOE_LAYOUTS[4])],
    ids=lambda v: getattr(v, "dirname", v),
)
def test_every_source_layout(megatron, tmp_path, fixture, layout):
    checkpoints = megatron(fixture)
    output = convert(checkpoints.paths[layout], tmp_path / "out", tp=4, moe_ep=2)
    assert_matches_megatron(output, checkpoints)


def test_softmax_before_topk_is_mode_none(megatron, tmp_path):
    checkpoints = megatron("mixtral_presoftmax")
    for layout in MOE_SMALL_LAYOUTS:
        output = convert(checkpoints.paths[layout], tmp_path / layout.dirname, tp=2, moe_ep=2)
        assert read_json(output / "config.json")["moe"]["normalization_mode"] == 0
        assert_matches_megatron(output, checkpoints)


def test_the_fixture_feels_routing(megatron, tmp_path):
    """The other normalisation mode, or one expert's up/gate halves swapped, is far off."""
    checkpoints = megatron("mixtral")
    output = convert(checkpoints.paths[MOE_LAYOUTS[0]], tmp_path / "out", tp=2, moe_ep=2)
    right = reference_logits(output, checkpoints.tokens)
    config = read_json(output / "config.json")
    config["moe"]["normalization_mode"] = 0
    (output / "config.json").write_text(json.dumps(config))
    assert (reference_logits(output, checkpoints.tokens) - right).abs().max() > FELT
    config["moe"]["normalization_mode"] = 1
    (output / "config.json").write_text(json.dumps(config))
    name = "transformer.layers.1.mlp.fc.weight"
    with safe_open(str(output / "rank1.safetensors"), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    tensors[name][1] = tensors[name][1].roll(tensors[name].shape[1] // 2, 0)  # [gate; up]
    from safetensors.torch import save_file

    save_file(tensors, str(output / "rank1.safetensors"))
    assert (reference_logits(output, checkpoints.tokens) - right).abs().max() > FELT


def test_experts_sit_on_their_ranks_as_up_then_gate(megatron, tmp_path):
    """TP 4, --moe-ep 2: rank r holds experts block r % 2, the moe-tp shard r // 2 of each, as
    [up_shard; gate_shard]; the router is float32 and whole on every rank, even in bf16."""
    checkpoints = megatron("mixtral")
    path = checkpoints.paths[MOE_LAYOUTS[5]]  # torch_dist
    output = convert(path, tmp_path / "out", tp=4, moe_ep=2, dtype="bfloat16")
    source = open_checkpoint(path)
    router = as_torch(source.tensor(names.layer_name(0, "mlp.router.weight")))
    for rank in range(4):
        with safe_open(str(output / f"rank{rank}.safetensors"), "pt") as f:
            assert f.get_tensor("transformer.layers.0.mlp.router.weight").dtype == torch.float32
            assert torch.equal(f.get_tensor("transformer.layers.0.mlp.router.weight"), router)
            fc = f.get_tensor("transformer.layers.0.mlp.fc.weight")
            proj = f.get_tensor("transformer.layers.0.mlp.proj.weight")
        assert fc.dtype == torch.bfloat16 and tuple(fc.shape) == (2, 48, 32)
        assert tuple(proj.shape) == (2, 32, 24)
        for j in range(2):
            expert = (rank % 2) * 2 + j
            fc1 = as_torch(source.tensor(names.expert_name(0, expert, "linear_fc1.weight")))
            fc2 = as_torch(source.tensor(names.expert_name(0, expert, "linear_fc2.weight")))
            gate, up = fc1.chunk(2)
            shard = slice((rank // 2) * 24, (rank // 2 + 1) * 24)
            expected = torch.cat([up[shard], gate[shard]]).to(torch.bfloat16)
            assert torch.equal(fc[j], expected), (rank, j)
            assert torch.equal(proj[j], fc2[:, shard].to(torch.bfloat16))


def test_plan_counts_experts_and_holds_one_at_a_time(megatron, capsys):
    from tasks.cli.main import main

    path = megatron("mixtral").paths[MOE_LAYOUTS[3]]
    assert main(["plan", "megatron-trtllm", str(path), "--tp", "4", "--moe-ep", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 experts (top-2), expert FFN 48" in out and "per rank: 4, 4, 4, 4" in out
    source = open_checkpoint(path)
    estimate = estimate_rank(source, Target(tp=4, moe_ep=2), 0)
    assert estimate.experts == 4
    one_expert = 48 * 32 * 4  # one expert's fc shard, fp32: the largest piece of this model
    assert estimate.peak_bytes == 2 * one_expert  # it and its copy, not the 2-expert stack


def _copy(megatron, fixture: str, layout, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(megatron(fixture).paths[layout], target)
    return target


@pytest.mark.parametrize(
    ("argument", "value", "feature"),
    [
        ("moe_router_score_function", "sigmoid", "sigmoid router scores"),
        ("moe_router_enable_expert_bias", True, "router expert bias"),
        ("moe_router_num_groups", 2, "group-limited routing"),
        ("moe_router_topk_scaling_factor", 2.5, "top-k scaling"),
    ],
)
def test_routing_trtllm_cannot_express_is_refused(
    megatron, tmp_path, capsys, argument, value, feature
):
    root = _copy(megatron, "mixtral", MOE_LAYOUTS[0], tmp_path)
    rewrite(
        root / "iter_0000010/mp_rank_00/model_optim_rng.pt",
        lambda payload: setattr(payload["args"], argument, value),
    )
    code, err = run_convert(capsys, root, tmp_path / "out", "--tp", "2")
    assert_failed_cleanly(code, err, tmp_path / "out", str(root), feature, argument)


@pytest.mark.parametrize(
    ("fixture", "features"),
    [
        ("moe_mixed_shared", ("dense and MoE layers mixed", "shared experts", "moe_layer_freq")),
        ("qwen3_moe", ("qk-layernorm in a MoE model", "Qwen3-MoE")),
    ],
)
def test_layouts_trtllm_cannot_express_are_refused(megatron, tmp_path, capsys, fixture, features):
    path = megatron(fixture).paths[MOE_SMALL_LAYOUTS[2]]
    code, err = run_convert(capsys, path, tmp_path / "out", "--tp", "2")
    assert_failed_cleanly(code, err, tmp_path / "out", str(path), *features)


def test_moe_ep_must_fit(megatron, tmp_path, capsys):
    mixtral = megatron("mixtral").paths[MOE_LAYOUTS[0]]
    code, err = run_convert(capsys, mixtral, tmp_path / "a", "--tp", "4", "--moe-ep", "3")
    assert code != 0 and "moe_ep=3 does not divide tp=4" in err
    cfg = open_checkpoint(mixtral).config
    with pytest.raises(
        IncompatibleParallelism, match="num_experts=6 does not split over --moe-ep 4"
    ):
        check_moe_split(replace(cfg, num_experts=6), 4, 4)
    with pytest.raises(IncompatibleParallelism, match="expert FFN size 48 does not split over"):
        check_moe_split(cfg, 4 * 5, 4)  # moe_tp 5
    dense = megatron("llama").paths[MOE_LAYOUTS[0]]
    code, err = run_convert(capsys, dense, tmp_path / "c", "--tp", "2", "--moe-ep", "2")
    assert_failed_cleanly(code, err, tmp_path / "c", "needs a mixture-of-experts model")


@pytest.mark.parametrize("fixture", ["mixtral", "mixtral_legacy_grouped"])
def test_rank_from_s3_fetches_its_experts_only(megatron, s3_env, tmp_path, fixture):
    """From S3 (legacy TP2 EP2): each rank's file equals the local conversion, and a rank that
    holds half the experts fetches well under the whole checkpoint."""
    from tasks.storage import mirror, sources
    from tests.test_sources import converted, object_bytes, upload

    root = megatron(fixture).paths[MOE_LAYOUTS[3]]
    uri = upload(s3_env, root, "ckpt")
    local = open_checkpoint(root)
    target = Target(tp=2, moe_ep=2)
    for rank in range(2):
        cache = tmp_path / f"cache{rank}"
        source, stats = sources.open_source_for_rank(uri, target, rank, cache, coalesce_gap=0)
        assert isinstance(source, mirror.MirroredCheckpoint)
        want = converted(local, target, rank, tmp_path / "local.safetensors")
        assert converted(source, target, rank, tmp_path / "s3.safetensors") == want
        assert stats.bytes_fetched < 0.75 * object_bytes(root), (rank, stats)
