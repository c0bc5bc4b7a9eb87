"""The tokenizer files a Hugging Face checkpoint carries: found, parsed and sized, never executed.

`read_tokenizer(directory)` checks what `--tokenizer DIR` holds before it is copied next to the
weights: the JSON files parse, `tokenizer.json` (or `vocab.json` + `merges.txt`, or a
SentencePiece `tokenizer.model`) is present, and the number of token ids is known so that it can
be checked against the embedding's rows. Nothing here imports transformers or tokenizers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.errors import ConversionError

# What save_pretrained writes for a tokenizer (and chat templates); other files are left behind.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
MAX_TOKENIZER_BYTES = 256 * 2**20  # the largest real tokenizer.json files are a few tens of MiB


class BadTokenizer(ConversionError):
    """`--tokenizer DIR` holds no usable tokenizer, or one that does not fit the model."""


@dataclass(frozen=True)
class TokenizerInfo:
    files: tuple[str, ...]  # the files to copy, by name
    size: int | None  # token ids (highest id + 1); None when only a SentencePiece model is given
    bos_token_id: int | None = None
    eos_token_id: int | None = None


def _json(path: Path) -> Any:
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise BadTokenizer(f"is larger than {MAX_TOKENIZER_BYTES // 2**20} MiB", path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadTokenizer(f"does not parse as JSON: {exc}", path) from None


def _ids(tokenizer: dict[str, Any], path: Path) -> dict[str, int]:
    """Token → id of a `tokenizer.json` (its model's vocabulary and the added tokens)."""
    model = tokenizer.get("model") if isinstance(tokenizer, dict) else None
    if not isinstance(model, dict):
        raise BadTokenizer("has no `model` object: not a tokenizers file", path)
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        ids = {str(k): v for k, v in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        ids = {str(entry[0]): i for i, entry in enumerate(vocab) if isinstance(entry, list)}
    else:
        raise BadTokenizer("has no vocabulary in `model.vocab`", path)
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("content"), str):
            ids[added["content"]] = added.get("id")
    if not all(type(v) is int and v >= 0 for v in ids.values()):
        raise BadTokenizer("has token ids that are not non-negative integers", path)
    return ids


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer(directory: Path) -> TokenizerInfo:
    """The tokenizer in `directory`, checked; BadTokenizer names the file and the problem."""
    if not directory.is_dir():
        raise BadTokenizer("is not a directory", directory)
    files = tuple(name for name in TOKENIZER_FILES if (directory / name).is_file())
    ids: dict[str, int] = {}
    if "tokenizer.json" in files:
        ids = _ids(_json(directory / "tokenizer.json"), directory / "tokenizer.json")
    elif "vocab.json" in files and "merges.txt" in files:
        vocab = _json(directory / "vocab.json")
        if not isinstance(vocab, dict) or not all(type(v) is int for v in vocab.values()):
            raise BadTokenizer("is not a token → id object", directory / "vocab.json")
        ids = dict(vocab)
    elif "tokenizer.model" not in files:
        raise BadTokenizer(
            "holds no tokenizer (tokenizer.json, vocab.json + merges.txt, or tokenizer.model)",
            directory,
        )
    config: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if name in files:
            data = _json(directory / name)
            if not isinstance(data, dict):
                raise BadTokenizer("is not a JSON object", directory / name)
            if name == "added_tokens.json":
                ids.update({str(k): v for k, v in data.items() if type(v) is int})
            else:
                config = {**data, **config}
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    return TokenizerInfo(
        files=files,
        size=max(ids.values()) + 1 if ids else None,
        bos_token_id=ids.get(bos) if bos else None,
        eos_token_id=ids.get(eos) if eos else None,
    )
