"""On-disk cache of tokenized data, so a rerun or a resume does not tokenize again.

The key hashes everything the result depends on: the bytes of the data files (a hub id
by name), the tokenizer (its vocabulary/merges, special tokens and chat template), the
data options, the seed and `CACHE_VERSION`. Change any of them and the key changes.
Entries are plain files (numpy arrays + JSON + JSONL), never pickles.
"""
from __future__ import annotations

import dataclasses
from array import array
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.data.conversation import Conversation
from tunesmith.data.tokenize import TokenizedSample
from tunesmith.errors import UserError

CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """`$TUNESMITH_CACHE`, else `$XDG_CACHE_HOME/tunesmith/tokenized` (~/.cache by default)."""
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunesmith" / "tokenized"


def _hash_source(digest: Any, source: str | None) -> None:
    """Feed a data file's bytes (streamed) or a hub id's name into `digest`."""
    if source is None:
        digest.update(b"<none>")
        return
    path = Path(source).expanduser()
    if path.is_file():
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(f"hub:{source}".encode())


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: the backend (vocab, merges, normalizer), specials, template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()


def cache_key(options: Any, tokenizer: Any, sources: str | list[str], seed: int, kind: str = "") -> str:
    """The hex key of one prepared dataset or mix (see the module docstring for what goes in).

    `kind` names a non-default tokenization (the objective's `tokenize` hook, e.g. pairs).
    """
    digest = hashlib.sha256(f"v{CACHE_VERSION}{kind}".encode())
    for source in [sources] if isinstance(sources, str) else sources:
        _hash_source(digest, source)
    _hash_source(digest, options.eval_data)
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(json.dumps(dataclasses.asdict(options), sort_keys=True, default=str).encode())
    digest.update(str(seed).encode())
    return digest.hexdigest()[:24]


def _pack(samples: list[TokenizedSample]) -> dict[str, np.ndarray]:
    """Samples -> flat int32 arrays plus offsets (one array each, fast to save and load)."""
    ids, labels = array("i"), array("i")
    for s in samples:  # array.extend runs in C: ~10x faster than numpy.fromiter over a generator
        ids.extend(s.input_ids)
        labels.extend(s.labels)
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    packed = {"ids": np.frombuffer(ids, dtype=np.int32), "labels": np.frombuffer(labels, dtype=np.int32),
              "offsets": offsets}
    if samples and hasattr(samples[0], "chosen_length"):  # preference pairs (data.pairs.TokenizedPair)
        packed["chosen_length"] = np.array([s.chosen_length for s in samples], dtype=np.int64)  # type: ignore[attr-defined]
    return packed


def _unpack(arrays: Any, sources: list[str]) -> list[Any]:
    """The inverse of `_pack`."""
    ids, labels, offsets = arrays["ids"].tolist(), arrays["labels"].tolist(), arrays["offsets"].tolist()
    if "chosen_length" in arrays:
        from tunesmith.data.pairs import TokenizedPair

        return [TokenizedPair(ids[a:b], labels[a:b], n, src)
                for a, b, n, src in zip(offsets, offsets[1:], arrays["chosen_length"].tolist(), sources)]
    return [TokenizedSample(ids[a:b], labels[a:b], src) for a, b, src in zip(offsets, offsets[1:], sources)]


def save_entry(directory: Path, key: str, train: list[TokenizedSample], evals: list[TokenizedSample],
               eval_conversations: list[Conversation], meta: dict[str, Any]) -> Path:
    """Write one cache entry atomically (a reader never sees a half-written entry)."""
    from tunesmith.data.readers import write_jsonl

    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=directory))
    for name, samples in (("train", train), ("eval", evals)):
        np.savez(tmp / f"{name}.npz", **_pack(samples))
        (tmp / f"{name}_sources.json").write_text(json.dumps([s.source for s in samples]), encoding="utf-8")
    write_jsonl(eval_conversations, tmp / "eval_conversations.jsonl")
    (tmp / "eval_conversation_sources.json").write_text(json.dumps([c.source for c in eval_conversations]),
                                                         encoding="utf-8")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    final = directory / key
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_entry(directory: Path, key: str) -> tuple[list[TokenizedSample], list[TokenizedSample],
                                                    list[Conversation], dict[str, Any]] | None:
    """A cache entry, or None when there is none (or it is unreadable: then it is rebuilt)."""
    from tunesmith.data.readers import read_conversations

    entry = directory / key
    if not (entry / "meta.json").is_file():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        parts = []
        for name in ("train", "eval"):
            sources = json.loads((entry / f"{name}_sources.json").read_text(encoding="utf-8"))
            with np.load(entry / f"{name}.npz") as arrays:
                parts.append(_unpack(arrays, sources))
        convs_path = entry / "eval_conversations.jsonl"
        eval_convs = read_conversations(str(convs_path))[0] if convs_path.stat().st_size else []
        sources = json.loads((entry / "eval_conversation_sources.json").read_text(encoding="utf-8"))
        for conv, source in zip(eval_convs, sources):
            conv.source = source
    except (OSError, ValueError, KeyError, UserError):
        return None
    return parts[0], parts[1], eval_convs, meta
