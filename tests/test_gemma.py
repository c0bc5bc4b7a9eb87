"""Gemma (v1), declared with `--architecture gemma` because Megatron-LM's args cannot say it: GeGLU
with tanh GELU, embeddings scaled by sqrt(hidden) at run time, zero-centred RMSNorm (Gemma's
`1 + w`), head size 16 ≠ hidden / heads, tied embeddings, GQA. The fixture is megatron-core's own
model with a sqrt(hidden) hook on its embedding; both targets must compute its logits."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.errors import UnsupportedModel
from converters.megatron.layout import open_checkpoint
from converters.torch_arrays import materialize as as_torch
from converters.trtllm.families import family_for
from tasks.cli.main import main
from tasks.jobs.checks import InvalidSpec
from tasks.kinds.megatron_trtllm import ConvertSpec
from tests.test_bad_input import rewrite
from tests.test_conversion import assert_matches_megatron, convert
from tests.test_hf_convert import assert_matches, hf_logits, tensors_of
from tests.trtllm_reference import reference_logits

transformers = pytest.importorskip("transformers")

FELT = 1e-3


def _layouts(checkpoints) -> dict[str, Path]:
    return {layout.dirname: path for layout, path in checkpoints.paths.items()}


@pytest.mark.parametrize(
    ("layout", "tp"),
    [
        ("legacy_tp2_pp1", 1),
        ("legacy_tp2_pp1", 2),
        ("legacy_tp2_pp1", 4),
        ("legacy_tp1_pp1", 2),
        ("torch_dist_tp2_pp1", 4),
    ],
)
def test_tensorrt_llm_logits_match_megatron(megatron, tmp_path, layout, tp):
    checkpoints = megatron("gemma")
    output = convert(_layouts(checkpoints)[layout], tmp_path / "out", tp=tp, architecture="gemma")
    config = json.loads((output / "config.json").read_text())
    assert config["architecture"] == "GemmaForCausalLM"
    assert config["hidden_act"] == "gelu_pytorch_tanh" and config["head_size"] == 16
    assert not config["attn_bias"] and not config["mlp_bias"]
    assert_matches_megatron(output, checkpoints)


def test_tensorrt_llm_stores_norms_plus_one_and_an_unscaled_table(megatron, tmp_path):
    checkpoints = megatron("gemma")
    source = open_checkpoint(_layouts(checkpoints)["legacy_tp1_pp1"], "gemma")
    output = convert(source.path, tmp_path / "out", tp=1, architecture="gemma")
    rank = load_file(str(output / "rank0.safetensors"))
    stored = as_torch(source.tensor("decoder.layers.1.pre_mlp_layernorm.weight"))
    assert torch.equal(rank["transformer.layers.1.post_layernorm.weight"], stored + 1)
    words = as_torch(source.tensor("embedding.word_embeddings.weight"))
    assert torch.equal(rank["transformer.vocab_embedding.weight"], words)
    assert torch.equal(rank["lm_head.weight"], words)  # the tied table, its own copy


def _rewrite_ranks(output: Path, change) -> None:
    for path in output.glob("rank*.safetensors"):
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})


def test_dropping_the_embedding_scale_or_the_plus_one_is_felt(megatron, tmp_path):
    """What a converter that forgot either would have written moves the logits."""
    checkpoints = megatron("gemma")
    output = convert(
        _layouts(checkpoints)["legacy_tp2_pp1"], tmp_path / "out", tp=2, architecture="gemma"
    )
    unscaled = shutil.copytree(output, tmp_path / "unscaled")
    name = "transformer.vocab_embedding.weight"
    _rewrite_ranks(unscaled, lambda t: t.update({name: t[name] / math.sqrt(64)}))
    diff = (reference_logits(unscaled, checkpoints.tokens) - checkpoints.logits).abs().max()
    assert diff.item() > FELT

    def minus_one(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if "layernorm" in k or k.endswith("ln_f.weight")]:
            tensors[key] = tensors[key] - 1

    no_plus_one = shutil.copytree(output, tmp_path / "no_plus_one")
    _rewrite_ranks(no_plus_one, minus_one)
    diff = (reference_logits(no_plus_one, checkpoints.tokens) - checkpoints.logits).abs().max()
    assert diff.item() > FELT


@pytest.mark.parametrize("layout", ["legacy_tp1_pp1", "legacy_tp2_pp1", "torch_dist_tp2_pp1"])
def test_hugging_face_logits_match_megatron(megatron, tmp_path, layout):
    """Through `porter convert megatron-hf --architecture GemmaForCausalLM` (the HF kind's
    architecture option is the declaration); norms written as stored (Gemma computes 1 + w)."""
    checkpoints = megatron("gemma")
    source = _layouts(checkpoints)[layout]
    out = tmp_path / "hf"
    args = ["convert", "megatron-hf", str(source), str(out), "--quiet"]
    assert main([*args, "--architecture", "GemmaForCausalLM"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma" and config["head_dim"] == 16
    assert config["hidden_activation"] == "gelu_pytorch_tanh" and config["tie_word_embeddings"]
    tensors = tensors_of(out)
    assert "lm_head.weight" not in tensors
    stored = as_torch(open_checkpoint(source, "gemma").tensor("decoder.final_layernorm.weight"))
    assert torch.equal(tensors["model.norm.weight"], stored)
    assert_matches(hf_logits(out, checkpoints.tokens), checkpoints.logits)
    # Gemma's 1 + w applied to a weight that already had its +1: another model.
    tensors["model.norm.weight"] = stored + 1
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    diff = (hf_logits(out, checkpoints.tokens) - checkpoints.logits).abs().max()
    assert diff.item() > FELT


def _contradicting(megatron, tmp_path: Path, **args) -> tuple[Path, Path]:
    source = shutil.copytree(_layouts(megatron("gemma"))["legacy_tp1_pp1"], tmp_path / "source")
    rank_file = next(source.rglob("model_optim_rng.pt"))
    rewrite(rank_file, lambda p: [setattr(p["args"], k, v) for k, v in args.items()])
    return source, rank_file


@pytest.mark.parametrize(
    ("argument", "value"),
    [("swiglu", True), ("layernorm_zero_centered_gamma", False), ("normalization", "LayerNorm")],
)
def test_a_declaration_the_args_contradict_is_refused(megatron, tmp_path, capsys, argument, value):
    source, rank_file = _contradicting(megatron, tmp_path, **{argument: value})
    out = str(tmp_path / "out")
    options = ["--tp", "1", "--architecture", "gemma", "--quiet"]
    code = main(["convert", "megatron-trtllm", str(source), out, *options])
    err = capsys.readouterr().err
    assert code == 1 and argument in err and str(rank_file) in err and "gemma" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(UnsupportedModel, match=argument):
        open_checkpoint(source, "gemma")


def test_undeclared_gemma_is_not_taken_for_another_model(megatron):
    """Without the declaration no family fits (the args say gelu, not gated, RMSNorm)."""
    source = open_checkpoint(_layouts(megatron("gemma"))["legacy_tp1_pp1"])
    assert source.config.architecture is None and not source.config.gated_mlp
    with pytest.raises(UnsupportedModel, match="not declared gemma"):
        family_for(source.config)


def test_the_declaration_is_in_the_job_id_only_when_given():
    plain = ConvertSpec(source="/a", output="/b", tp=2)
    assert "architecture" not in plain.to_dict()
    declared = ConvertSpec(source="/a", output="/b", tp=2, architecture="gemma")
    assert declared.to_dict()["architecture"] == "gemma"
    assert ConvertSpec.from_dict(declared.to_dict()) == declared
    with pytest.raises(InvalidSpec, match="architecture"):
        ConvertSpec(source="/a", output="/b", tp=2, architecture="llama")


def test_porter_verify_computes_gemma_on_both_targets(megatron, tmp_path, capsys):
    """`--verify` (the job step) passes for both exports; `porter verify --architecture gemma`
    finds an export whose norms lost their +1 at layer 0, and without the declaration the
    source computes another model."""
    source = str(_layouts(megatron("gemma"))["legacy_tp2_pp1"])
    trt, hf = str(tmp_path / "trt"), str(tmp_path / "hf")
    common = ["--verify", "--quiet"]
    assert (
        main(
            [
                "convert",
                "megatron-trtllm",
                source,
                trt,
                "--tp",
                "2",
                "--architecture",
                "gemma",
                *common,
            ]
        )
        == 0
    )
    assert main(["convert", "megatron-hf", source, hf, "--architecture", "gemma", *common]) == 0

    def minus_one(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if "layernorm" in k]:
            tensors[key] = tensors[key] - 1

    _rewrite_ranks(Path(trt), minus_one)
    capsys.readouterr()
    assert main(["verify", source, trt, "--architecture", "gemma", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out.splitlines()[2] and out.splitlines()[2].startswith("layer 0")
    assert main(["verify", source, hf, "--quiet"]) == 1  # undeclared: not the model in the args
