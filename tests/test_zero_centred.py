"""Zero-centred norm weights (`layernorm_zero_centered_gamma`, megatron-core 0.16's name for
Megatron-LM's `--apply-layernorm-1p`): the model computes `1 + weight` in every norm, q/k norms
included. A Qwen3-style checkpoint saved with only the new argument name converts, for both
targets, to a model whose logits are Megatron's own (before, the argument was ignored and such a
checkpoint converted silently wrong)."""

from __future__ import annotations

import shutil

import pytest
import torch

from converters.megatron.layout import open_checkpoint
from tests.conftest import HF_LAYOUTS
from tests.test_bad_input import rewrite
from tests.test_conversion import assert_matches_megatron, convert
from tests.test_hf_convert import assert_matches, hf_logits, write_hf

transformers = pytest.importorskip("transformers")

LAYOUTS = (HF_LAYOUTS[0], HF_LAYOUTS[1], HF_LAYOUTS[3])
FELT = 1e-3


def test_args_name_it_as_megatron_core_016_saves_it(megatron):
    source = open_checkpoint(megatron("qwen3_1p").paths[LAYOUTS[0]])
    rank_file = next(source.path.rglob("model_optim_rng.pt"))
    args = torch.load(rank_file, weights_only=False, mmap=True)["args"]
    assert args.layernorm_zero_centered_gamma is True and args.apply_layernorm_1p is False
    assert source.config.apply_layernorm_1p


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.dirname)
def test_hugging_face_logits_match_megatron(megatron, tmp_path, layout):
    checkpoints = megatron("qwen3_1p")
    write_hf(checkpoints.paths[layout], tmp_path / "hf")
    assert_matches(hf_logits(tmp_path / "hf", checkpoints.tokens), checkpoints.logits)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensorrt_llm_logits_match_megatron(megatron, tmp_path, tp):
    checkpoints = megatron("qwen3_1p")
    output = convert(checkpoints.paths[LAYOUTS[1]], tmp_path / "out", tp=tp)
    assert_matches_megatron(output, checkpoints)


def test_ignoring_the_argument_is_felt(megatron, tmp_path):
    """The same checkpoint read as if the argument were absent computes another model."""
    checkpoints = megatron("qwen3_1p")
    copy = shutil.copytree(checkpoints.paths[LAYOUTS[0]], tmp_path / "source")
    path = next(copy.rglob("model_optim_rng.pt"))
    rewrite(path, lambda payload: setattr(payload["args"], "layernorm_zero_centered_gamma", False))
    write_hf(copy, tmp_path / "hf")
    diff = (hf_logits(tmp_path / "hf", checkpoints.tokens) - checkpoints.logits).abs().max()
    assert diff.item() > FELT
