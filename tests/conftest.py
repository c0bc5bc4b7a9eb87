"""Session fixtures: real Megatron checkpoints written once by megatron-core, shared by xdist workers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from converters.megatron.example import Layout, write_example_checkpoints
from tests.cluster import cluster, redis_url  # noqa: F401  (fixtures: real servers, lazily)
from tests.s3_server import moto_s3, s3_env  # noqa: F401

LAYOUTS = (
    Layout("legacy", 1, 1),
    Layout("legacy", 2, 1),
    Layout("legacy", 1, 2),
    Layout("legacy", 2, 2),
    Layout("torch_dist", 2, 1),
)

# The dense Hugging Face families: each layout the readers distinguish, written once.
HF_LAYOUTS = (
    Layout("legacy", 1, 1),
    Layout("legacy", 2, 1),
    Layout("legacy", 1, 2),
    Layout("torch_dist", 2, 1),
)
# 48 tokens: enough positions for Llama-3.1 RoPE scaling to move the logits (see test_hf_families).
HF_SEQ_LEN = 48

MOE_LAYOUTS = (
    Layout("legacy", 1, 1),
    Layout("legacy", 2, 1),
    Layout("legacy", 1, 1, 2),
    Layout("legacy", 2, 1, 2),
    Layout("legacy", 1, 2),
    Layout("torch_dist", 2, 1, 2),
)
MOE_SMALL_LAYOUTS = (
    Layout("legacy", 1, 1),
    Layout("legacy", 2, 1, 2),
    Layout("torch_dist", 2, 1, 2),
)

# name → (family, layouts, keyword arguments of write_example_checkpoints)
FIXTURE_SETS: dict[str, tuple[str, tuple[Layout, ...], dict]] = {
    "llama": ("llama", LAYOUTS, {}),
    "gpt": ("gpt", LAYOUTS, {}),
    # Transformer Engine fused-norm names, bf16 weights.
    "llama_te_bf16": (
        "llama",
        (Layout("legacy", 2, 1),),
        {"transformer_engine_names": True, "dtype": torch.bfloat16},
    ),
    "llama31": ("llama31", HF_LAYOUTS, {"seq_len": HF_SEQ_LEN}),
    "qwen2": ("qwen2", HF_LAYOUTS, {"seq_len": HF_SEQ_LEN}),
    "qwen3": ("qwen3", HF_LAYOUTS, {"seq_len": HF_SEQ_LEN}),
    # Mixture of experts (converters/megatron/example_moe.py): 4 experts of FFN 48, top-2, every
    # expert and router distinct. mp_rank_00_001 means EP rank 1 in the *_ep2 layouts and PP
    # rank 1 in legacy_tp1_pp2: only the args tell.
    "mixtral": ("mixtral", MOE_LAYOUTS, {"seq_len": HF_SEQ_LEN}),
    "mixtral_presoftmax": ("mixtral_presoftmax", MOE_SMALL_LAYOUTS, {"seq_len": HF_SEQ_LEN}),
    # The same model stored as TEGroupedMLP (linear_fc1.weight{i}) and legacy GroupedMLP
    # (weight1/weight2, transposed); torch_dist is the same for every expert layout.
    "mixtral_te_grouped": (
        "mixtral",
        (Layout("legacy", 2, 1, 2),),
        {"seq_len": HF_SEQ_LEN, "overrides": {"expert_layout": "te_grouped"}},
    ),
    "mixtral_legacy_grouped": (
        "mixtral",
        (Layout("legacy", 2, 1, 2), Layout("legacy", 1, 2)),
        {"seq_len": HF_SEQ_LEN, "overrides": {"expert_layout": "legacy_grouped"}},
    ),
    "qwen3_moe": ("qwen3_moe", MOE_SMALL_LAYOUTS, {"seq_len": HF_SEQ_LEN}),
    # Qwen3-MoE with softmax before top-k (HF norm_topk_prob false), and with a dense first
    # layer (HF mlp_only_layers).
    "qwen3_moe_presoftmax": (
        "qwen3_moe",
        (Layout("legacy", 2, 1, 2),),
        {"seq_len": HF_SEQ_LEN, "overrides": {"moe_router_pre_softmax": True}},
    ),
    "qwen3_moe_mixed": (
        "qwen3_moe",
        (Layout("legacy", 1, 1), Layout("torch_dist", 2, 1, 2)),
        {"seq_len": HF_SEQ_LEN, "overrides": {"moe_layer_freq": [0, 1]}},
    ),
    # A dense first layer (moe_layer_freq [0, 1, 1]) and shared experts (2 x 32).
    "moe_mixed_shared": ("moe_mixed_shared", MOE_SMALL_LAYOUTS, {"seq_len": HF_SEQ_LEN}),
    # Zero-centred norm weights (megatron-core 0.16's layernorm_zero_centered_gamma).
    "qwen3_1p": (
        "qwen3_1p",
        (HF_LAYOUTS[0], HF_LAYOUTS[1], HF_LAYOUTS[3]),
        {"seq_len": HF_SEQ_LEN},
    ),
    # Gemma (declared: GeGLU, sqrt(hidden) embedding scale, zero-centred norms, head size 16).
    "gemma": (
        "gemma",
        (Layout("legacy", 1, 1), Layout("legacy", 2, 1), Layout("torch_dist", 2, 1)),
        {"seq_len": HF_SEQ_LEN},
    ),
    # Multi-query attention: megatron-core writes it at TP=1 only.
    "starcoder": (
        "starcoder",
        (Layout("legacy", 1, 1), Layout("legacy", 1, 2), Layout("torch_dist", 1, 1)),
        {},
    ),
}


@dataclass(frozen=True)
class Checkpoints:
    """One family's checkpoints in several layouts, with the Megatron model's own logits."""

    family: str
    paths: dict[Layout, Path]
    tokens: torch.Tensor
    logits: torch.Tensor


def _load_or_write(root: Path, name: str) -> Checkpoints:
    family, layouts, kwargs = FIXTURE_SETS[name]
    target = root / name
    done = target / "oracle.pt"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            result = write_example_checkpoints(target, family, layouts, **kwargs)
            torch.save({"tokens": result.tokens, "logits": result.logits}, target / "oracle.tmp")
            (target / "oracle.tmp").replace(done)
    oracle = torch.load(done, weights_only=True)
    paths = {layout: target / layout.dirname for layout in layouts}
    return Checkpoints(family, paths, oracle["tokens"], oracle["logits"])


@pytest.fixture(autouse=True)
def _revive_workers(request: pytest.FixtureRequest) -> None:
    """Tests that use the cluster get all its workers (an earlier test may have killed one)."""
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").revive()


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A directory of this session, shared by all its xdist workers."""
    session_dir = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # xdist: each worker's basetemp sits in the session's directory
        session_dir = session_dir.parent
    root = session_dir / "porter-megatron-fixtures"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def megatron(fixture_root: Path):
    """`megatron(name)` → the `Checkpoints` of a fixture set, written on first use."""
    cache: dict[str, Checkpoints] = {}

    def get(name: str) -> Checkpoints:
        if name not in cache:
            cache[name] = _load_or_write(fixture_root, name)
        return cache[name]

    return get


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
