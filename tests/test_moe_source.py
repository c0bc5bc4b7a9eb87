"""Reading mixture-of-experts checkpoints written by real megatron-core (converters/megatron/).

Every layout of one model (TP, EP, PP, torch_dist, the three legacy expert layouts) must give the
same global tensors under the canonical names; the TP=1 legacy checkpoint is the reference.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from converters.errors import CorruptCheckpoint, UnsupportedModel
from converters.megatron import names
from converters.megatron.layout import open_checkpoint
from converters.megatron.rank_dirs import rank_dir_name, rank_key
from converters.model import ModelConfig
from converters.torch_arrays import materialize as as_torch
from tests.conftest import MOE_LAYOUTS
from tests.test_bad_input import rewrite

REFERENCE = MOE_LAYOUTS[0]  # legacy TP=1


def _moe_names(cfg: ModelConfig) -> list[str]:
    out = ["embedding.word_embeddings.weight", "output_layer.weight"]
    for layer in range(cfg.num_layers):
        out += [names.layer_name(layer, "pre_mlp_layernorm.weight")]
        if not cfg.is_moe_layer(layer):
            out += [names.layer_name(layer, "mlp.linear_fc1.weight")]
            continue
        out += [names.layer_name(layer, "mlp.router.weight")]
        if cfg.moe_shared_expert_intermediate_size:
            out += [
                names.layer_name(layer, f"mlp.shared_experts.linear_fc{i}.weight") for i in (1, 2)
            ]
        for expert in range(cfg.num_experts):
            out += [names.expert_name(layer, expert, f"linear_fc{i}.weight") for i in (1, 2)]
    return out


@pytest.mark.parametrize(
    "fixture", ["mixtral", "mixtral_te_grouped", "mixtral_legacy_grouped", "moe_mixed_shared"]
)
def test_every_layout_reads_the_same_experts(megatron, fixture):
    reference = open_checkpoint(megatron("mixtral").paths[REFERENCE])
    if fixture == "moe_mixed_shared":
        reference = open_checkpoint(megatron(fixture).paths[REFERENCE])
    cfg = reference.config
    expected = {name: as_torch(reference.tensor(name)) for name in _moe_names(cfg)}
    for layout, path in megatron(fixture).paths.items():
        source = open_checkpoint(path)
        assert replace(source.config, moe_grouped_gemm=False) == cfg, layout
        for name, tensor in expected.items():
            assert torch.equal(as_torch(source.tensor(name)), tensor), (layout, name)
            # A slice of one expert is that slice (the re-shard rules narrow before reading).
            rows = tensor.shape[0] // 2
            assert torch.equal(as_torch(source.tensor(name).narrow(0, 1, rows)), tensor[1:][:rows])


def test_config_fields_and_distinct_experts(megatron):
    mixed = open_checkpoint(megatron("moe_mixed_shared").paths[REFERENCE]).config
    assert mixed.moe_layer_pattern == (0, 1, 1) and not mixed.is_moe_layer(0)
    assert mixed.moe_shared_expert_intermediate_size == 64 and mixed.shared_fc1_rows == 128
    source = open_checkpoint(megatron("mixtral").paths[REFERENCE])
    cfg = source.config
    assert (cfg.num_experts, cfg.moe_router_topk, cfg.expert_ffn_hidden_size) == (4, 2, 48)
    assert (
        cfg.ffn_hidden_size == 64 and not cfg.moe_router_pre_softmax and cfg.moe_layer_pattern == ()
    )
    assert ModelConfig(**json.loads(json.dumps(mixed.to_dict()))) == mixed  # as jobs store it
    experts = [
        as_torch(source.tensor(names.expert_name(layer, e, "linear_fc1.weight")))
        for layer in range(cfg.num_layers)
        for e in range(cfg.num_experts)
    ]
    assert all(not torch.equal(a, b) for i, a in enumerate(experts) for b in experts[:i])
    routers = [
        as_torch(source.tensor(names.layer_name(layer, "mlp.router.weight"))) for layer in (0, 1)
    ]
    assert (
        not torch.equal(*routers) and len(set(routers[0].flatten().tolist())) == routers[0].numel()
    )


def test_one_expert_reads_only_its_own_bytes(megatron):
    """Bounded memory: an expert's lazy tensor reads that expert's bytes, from its EP rank."""
    paths = megatron("mixtral").paths
    for layout in (MOE_LAYOUTS[3], MOE_LAYOUTS[5]):  # legacy TP2 EP2, torch_dist TP2 EP2
        source = open_checkpoint(paths[layout])
        tensor = source.tensor(names.expert_name(1, 3, "linear_fc1.weight"))
        ranges = tensor.file_ranges()
        assert sum(length for _, _, length in ranges) < 2 * tensor.nbytes, (layout, ranges)
        if layout.format == "legacy":  # expert 3 of 4 lives on EP rank 1 only
            assert {path.parent.name for path, _, _ in ranges} == {
                "mp_rank_00_001",
                "mp_rank_01_001",
            }
    grouped = open_checkpoint(megatron("mixtral_legacy_grouped").paths[MOE_LAYOUTS[3]])
    tensor = grouped.tensor(names.expert_name(0, 2, "linear_fc2.weight"))
    assert sum(length for _, _, length in tensor.file_ranges()) == tensor.nbytes


def _copy(megatron, fixture: str, layout, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(megatron(fixture).paths[layout], target)
    return target


def test_missing_expert_shards_are_named(megatron, tmp_path):
    root = _copy(megatron, "mixtral", MOE_LAYOUTS[3], tmp_path)
    for name in ("mp_rank_00_001", "mp_rank_01_001"):
        shutil.rmtree(root / "iter_0000010" / name)
    with pytest.raises(CorruptCheckpoint) as err:
        open_checkpoint(root)
    for name in ("mp_rank_00_001", "mp_rank_01_001"):
        assert f"{name}/model_optim_rng.pt" in str(err.value)
    assert "EP=2" in str(err.value)


def test_folder_names_are_read_from_the_args(megatron, tmp_path):
    """mp_rank_00_001 is EP rank 1 here; args claiming PP=2 instead make it a pipeline stage,
    whose layers then do not add up: refused, not silently misread."""
    root = _copy(megatron, "mixtral", MOE_LAYOUTS[2], tmp_path)  # legacy TP1 EP2
    for name in ("mp_rank_00_000", "mp_rank_00_001"):

        def as_pipeline(payload):
            payload["args"].expert_model_parallel_size = 1
            payload["args"].pipeline_model_parallel_size = 2

        rewrite(root / "iter_0000010" / name / "model_optim_rng.pt", as_pipeline)
    with pytest.raises(CorruptCheckpoint, match="layers"):
        open_checkpoint(root)


def test_expert_tensor_parallel_other_than_tp_is_refused(megatron, tmp_path):
    root = _copy(megatron, "mixtral", MOE_LAYOUTS[3], tmp_path)
    path = root / "iter_0000010" / "mp_rank_00_000" / "model_optim_rng.pt"
    rewrite(path, lambda payload: setattr(payload["args"], "expert_tensor_parallel_size", 1))
    with pytest.raises(UnsupportedModel, match="expert_tensor_parallel_size=1") as err:
        open_checkpoint(root)
    assert str(path) in str(err.value)


def test_moe_args_without_expert_weights_are_refused(megatron, tmp_path):
    root = _copy(megatron, "llama", REFERENCE, tmp_path)
    path = root / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    rewrite(path, lambda payload: setattr(payload["args"], "num_experts", 8))
    with pytest.raises(CorruptCheckpoint, match=r"mixture-of-experts .num_experts=8.*router"):
        open_checkpoint(root)


def test_a_lone_three_digit_part_means_what_the_args_say():
    """mp_rank_00_001: PP rank 1 when PP > 1, EP rank 1 when EP > 1; both parts with both."""
    assert rank_key((0, 1), 2, 1) == (0, 1, 0)
    assert rank_key((0, 1), 1, 2) == (0, 0, 1)
    assert rank_key((1, 2, 3), 4, 4) == (1, 2, 3)
    assert rank_key((0, 1), 1, 1) is None and rank_key((0,), 2, 1) is None
    assert rank_dir_name(1, 2, 3, (4, 4)) == "mp_rank_01_002_003"
    assert rank_dir_name(1, 0, 3, (1, 4)) == "mp_rank_01_003"
