"""The Megatron → Hugging Face layout job kind: what transformers, vLLM, SGLang and TensorRT-LLM's
PyTorch backend load (`config.json`, `generation_config.json`, `model.safetensors` or
`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`).

    inspect ─► write shard s (fan-out) ─► config + index ─► publish

HF checkpoints are unsharded by TP: each output tensor merges the source's TP shards. The plan
assigns tensors to shard files in model order up to `--max-shard-size`; a shard step holds one
tensor at a time and fetches from S3 only the byte ranges its tensors read.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converters.errors import ConversionError
from converters.hf.tokenizer import (
    MAX_TOKENIZER_BYTES,
    TOKENIZER_FILES,
    BadTokenizer,
    TokenizerInfo,
    read_tokenizer,
)
from tasks.jobs.checks import InvalidSpec, check_fields, check_int, check_location, show
from tasks.jobs.ids import tag_digest
from tasks.jobs.locations import check_tree
from tasks.jobs.outputs import artifact_result
from tasks.kinds import register
from tasks.kinds.base import (
    JobKind,
    KindCli,
    Phase,
    Step,
    StepContext,
    bytes_progress,
    human,
    local_location,
)
from tasks.kinds.megatron_source import (
    add_source_arguments,
    check_source_spec,
    inspect_megatron,
    print_summary_head,
    put_json,
    source_architecture,
    source_fields,
    source_identity,
    warn_nonfinite,
)
from tasks.kinds.verify_step import verification_summary, verify_phase, verify_plan
from tasks.ops.memory import PeakAnonSampler, peak_rss_bytes, reset_peak_rss
from tasks.storage.store import open_store

if TYPE_CHECKING:
    from converters.hf.plan import HfTarget

# The converters (numpy, the readers) are imported by the steps that use them: the command line and the job
# service load this module to check specs and show records (tests/test_cli_imports.py).

KIND = "megatron-hf"
DEFAULT_SHARD_BYTES = 5 * 10**9  # save_pretrained's default, "5GB"
MAX_VOCAB = 2**31 - 1
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a size written as Hugging Face's `max_shard_size` takes it: `5GB` (10^9),
    `500MB`, `100KB`, `2GiB` (2^30), or a plain integer of bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConversionError(f"--max-shard-size {text!r:.40}: give bytes, or e.g. 5GB, 500MB")
    return int(match.group(1)) * _UNITS[(match.group(2) or "").upper()]


@dataclass(frozen=True)
class HfSpec:
    """A Megatron → Hugging Face layout conversion: JSON-serialisable, the unit of work of a job."""

    source: str
    output: str
    dtype: str | None = None
    max_shard_size: int = DEFAULT_SHARD_BYTES
    architecture: str | None = None
    vocab_size: int | None = None
    tokenizer: str | None = None  # a directory (or s3:// prefix) of tokenizer files to copy
    kind: str = KIND
    nonfinite: str = "warn"
    verify: bool = False  # run `porter verify` on the export before publishing

    def __post_init__(self) -> None:
        check_source_spec(self, KIND)
        check_int(self.max_shard_size, "max_shard_size", 1, 2**62)
        if self.architecture is not None and (
            not isinstance(self.architecture, str)
            or not re.fullmatch(r"\w{1,100}", self.architecture)
        ):
            raise InvalidSpec(f"architecture {show(self.architecture)} is not a class name")
        if self.vocab_size is not None:
            check_int(self.vocab_size, "vocab_size", 1, MAX_VOCAB)
        if self.tokenizer is not None:
            check_location(self.tokenizer, "TOKENIZER")

    @property
    def target(self) -> HfTarget:
        from converters.hf.plan import HfTarget

        return HfTarget(
            dtype=self.dtype,
            max_shard_bytes=self.max_shard_size,
            vocab_size=self.vocab_size,
            architecture=self.architecture,
            nonfinite=self.nonfinite,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["verify"]:  # the default: job ids stay what they were before it
            del data["verify"]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> HfSpec:
        """A spec from its JSON form; unknown, missing or mistyped fields are InvalidSpec."""
        return cls(**check_fields(data, cls, ("source", "output"), "the job spec"))


def inspect_source(spec: HfSpec) -> dict[str, Any]:
    """Read the source's metadata only: format, model config, identity, the shard plan."""
    from converters.hf.families import family_for
    from converters.hf.plan import check_target, plan_shards

    def plan(source: Any) -> dict[str, Any]:
        check_target(source.config, spec.target)
        shards = plan_shards(source, spec.target)
        return {
            "architecture": family_for(source.config, spec.architecture).architecture,
            "shards": [asdict(shard) for shard in shards],
            "tokenizer": _check_tokenizer(spec, source.config.vocab_size),
            **verify_plan(spec, source.config.num_layers),
        }

    return inspect_megatron(spec, plan)


def _fetch_tokenizer(uri: str, directory: Path) -> TokenizerInfo:
    """Copy the tokenizer files at `uri` (a directory or s3:// prefix) into `directory`, checked."""
    check_tree(uri)  # no symlink out of PORTER_ALLOWED_SOURCES
    store = open_store(uri)
    present = set(store.list())
    for name in TOKENIZER_FILES:
        if name in present:
            art = store.stat(name)
            if art is not None and art.bytes > MAX_TOKENIZER_BYTES:
                raise BadTokenizer(
                    f"is {art.bytes} bytes; too large for a tokenizer", store.uri(name)
                )
            store.get_file(name, directory / name)
    try:
        return read_tokenizer(directory)
    except ConversionError as exc:  # name the files as the user gave them, not the copies
        name = Path(exc.path).name if exc.path and Path(exc.path) != directory else ""
        raise type(exc)(exc.reason, store.uri(name)) from None


def _check_tokenizer(spec: HfSpec, rows: int) -> dict[str, Any] | None:
    """The `--tokenizer` files, checked to parse and to fit the vocab that will be written."""
    if spec.tokenizer is None:
        return None
    with tempfile.TemporaryDirectory(prefix="porter-tokenizer-") as tmp:
        info = _fetch_tokenizer(spec.tokenizer, Path(tmp))
    vocab = spec.vocab_size or rows
    if info.size is not None and info.size > vocab:
        what = f"--vocab-size {vocab}" if spec.vocab_size else f"the checkpoint's {rows} vocab rows"
        raise BadTokenizer(
            f"has {info.size} token ids, more than {what}", open_store(spec.tokenizer).uri()
        )
    return asdict(info)


def convert_shard_step(
    spec: HfSpec, tag: str, shard: dict[str, Any], progress: Any = None
) -> dict[str, Any]:
    """Write one planned shard file to OUTPUT (fetching only the source bytes it reads)."""
    from converters.hf.convert import convert_shard
    from converters.hf.plan import hf_tensors
    from tasks.storage import sources

    store = open_store(spec.output)
    key, index, names = shard["file"], shard["index"], set(shard["tensors"])
    done = artifact_result(store, key, tag)
    if done:  # a re-delivered, retried or resumed step
        zero = ("bytes_read", "bytes_fetched", "peak_anon_bytes", "peak_rss_bytes")
        return {"shard": index, "seconds": 0.0, "nonfinite": [], **dict.fromkeys(zero, 0), **done}
    source, fetched = sources.open_source_for(
        spec.source,
        lambda s: [t.source for t in hf_tensors(s, spec.target) if t.name in names],
        expected_digest=tag_digest(tag),
        architecture=source_architecture(spec),
    )
    reset_peak_rss()
    with store.scratch(key) as tmp, PeakAnonSampler() as sampler:
        result = convert_shard(source, spec.target, index, tmp, progress)
        store.put_file(tmp, key, sha256=result.sha256, tag=tag, move=True)
    return {
        "shard": index,
        "file": key,
        "bytes_written": result.bytes_written,
        "bytes_read": result.bytes_read,
        "sha256": result.sha256,
        "seconds": result.seconds,
        "nonfinite": result.nonfinite,
        "bytes_fetched": fetched.bytes_fetched,
        "peak_anon_bytes": sampler.peak,
        "peak_rss_bytes": peak_rss_bytes(),
        "pid": os.getpid(),
        "reused": False,
    }


def _copy_tokenizer(spec: HfSpec, tag: str, files: list[str]) -> list[dict[str, Any]]:
    source, out, copied = open_store(spec.tokenizer or ""), open_store(spec.output), []
    check_tree(*(source.uri(name) for name in files), walk=False)  # linked since the plan?
    for name in files:
        with out.scratch(name) as tmp:
            source.get_file(name, tmp)
            art = out.put_file(tmp, name, tag=tag, move=True)
        copied.append({"file": name, "bytes_written": art.bytes, "sha256": art.sha256})
    return copied


def write_config_step(spec: HfSpec, tag: str, inspected: dict[str, Any]) -> dict[str, Any]:
    """Write `config.json`, `generation_config.json`, the tokenizer files (`--tokenizer`) and, for
    several shards, the index."""
    from converters.hf.config import generation_config, hf_config, shard_index
    from converters.model import ModelConfig

    config = ModelConfig(**inspected["config"])
    tokenizer = inspected.get("tokenizer") or {}
    special = {k: tokenizer.get(k) for k in ("bos_token_id", "eos_token_id")}
    files = [
        put_json(spec.output, tag, "config.json", hf_config(config, spec.target)),
        put_json(spec.output, tag, "generation_config.json", generation_config(config, **special)),
        *_copy_tokenizer(spec, tag, tokenizer.get("files", [])),
    ]
    shards = inspected["shards"]
    if len(shards) > 1:
        index = shard_index(shards)
        files.append(put_json(spec.output, tag, "model.safetensors.index.json", index))
    return {"files": files, "bytes_written": sum(f["bytes_written"] for f in files)}


def source_summary(inspected: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records about the Megatron source."""
    keys = ("format", "source_tp", "source_pp", "architecture", "source_bytes", "source_digest")
    return {**{k: inspected[k] for k in keys}, **verification_summary(inspected)}


def _published(ctx: StepContext) -> list[dict[str, Any]]:
    results = ctx.results()
    shards = [results[f"shard:{i}"] for i in range(len(ctx.inspected["shards"]))]
    return shards + results["config"]["files"]


SHARDS = Phase(
    step="shard",
    task="porter.hf.shard",
    count="shards",
    run=lambda ctx, i: convert_shard_step(
        ctx.spec, ctx.tag, ctx.inspected["shards"][i], ctx.progress
    ),
    body_task="porter.hf.assemble",
    body_id="assemble",
    then=Step("config", lambda ctx: write_config_step(ctx.spec, ctx.tag, ctx.inspected)),
    cost=lambda inspected, i: (
        inspected["shards"][i]["peak_bytes"],
        inspected["shards"][i]["bytes_written"],
    ),
)

VERIFY = verify_phase("porter.hf.verify", "porter.hf.verified")

# ── the command line ──────────────────────────────────────────────────────────────────────────


def _add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_source_arguments(parser, command)
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest weight file, as save_pretrained takes it: 5GB, 500MB, 2GiB or bytes "
        "(default 5GB)",
    )
    parser.add_argument(
        "--architecture", help="HF architecture (default: inferred, e.g. LlamaForCausalLM)"
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="keep the first N vocab rows (default: Megatron's padded rows)",
    )
    parser.add_argument(
        "--tokenizer",
        help="directory (or s3:// prefix) of tokenizer files to copy next to the weights "
        "(checked: they parse, and the tokenizer fits the vocab)",
    )


def _spec_from_args(args: argparse.Namespace) -> HfSpec:
    return HfSpec(
        **source_fields(args),
        max_shard_size=parse_size(args.max_shard_size),
        architecture=args.architecture,
        vocab_size=args.vocab_size,
        tokenizer=None if args.tokenizer is None else local_location(args.tokenizer, "TOKENIZER"),
    )


def _report(spec: HfSpec, summary: Any) -> None:
    """The closing summary of `porter convert megatron-hf`."""
    print_summary_head(spec, summary, "Hugging Face layout")
    print(f"{'bytes':>12}  {'seconds':>8}  {'peak anon':>11}  sha256            file")
    shards = summary.fanned("shard")
    for r in shards:
        print(
            f"{human(r['bytes_written']):>12}  {r['seconds']:>8.2f}  "
            f"{human(r['peak_anon_bytes']):>11}  {r['sha256'][:16]}  {r['file']}"
            + ("  (reused)" if r.get("reused") else "")
        )
    warn_nonfinite(shards, lambda r: "")


def _print_plan(inspected: dict[str, Any]) -> None:
    """`porter plan megatron-hf`: per shard, its tensors and what it reads, writes and holds."""
    cfg = inspected["config"]
    print(
        f"{inspected['format']} checkpoint, training TP={inspected['source_tp']} "
        f"PP={inspected['source_pp']} -> {inspected['architecture']}, {cfg['num_layers']} layers, "
        f"hidden {cfg['hidden_size']}; source files {human(inspected['source_bytes'])}"
    )
    print(f"{'tensors':>7}  {'reads':>12}  {'writes':>12}  {'peak memory':>12}  file")
    for s in inspected["shards"]:
        print(
            f"{len(s['tensors']):>7}  {human(s['bytes_read']):>12}  "
            f"{human(s['bytes_written']):>12}  {human(s['peak_bytes']):>12}  {s['file']}"
        )


KIND_SPEC = register(
    JobKind(
        name=KIND,
        spec_type=HfSpec,
        identity=source_identity,
        inspect=inspect_source,
        phases=(SHARDS, VERIFY),
        published=_published,
        source_summary=source_summary,
        progress=lambda record: bytes_progress(record, "shard", "shards"),
        checkpoint_field="source",
        cli=KindCli(
            help="Megatron-LM → Hugging Face layout (transformers, vLLM, SGLang, TensorRT-LLM)",
            add_arguments=_add_arguments,
            spec_from_args=_spec_from_args,
            report=_report,
            print_plan=_print_plan,
            describe=lambda spec: f"{spec['source']} -> {spec['output']} (Hugging Face layout)",
        ),
    )
)
