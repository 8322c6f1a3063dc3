"""Real chat templates on real vocabularies, for the per-family tests (no network).

tests/fixtures/templates/ holds llama.cpp's copies of the models' chat templates (jinja/),
three real vocabularies converted from llama.cpp's ggml-vocab-*.gguf (vocab/, built by
scripts/build_template_fixtures.py) and families.json: per family its template, vocabulary,
special tokens and the end-of-turn token its tokenizer_config / generation_config declare.
Families whose own vocabulary is too big to ship share one of the three (gpt-2's byte-level
BPE with the GPT-4-style split regex the modern families use, or Llama 2's SentencePiece),
with their own special tokens added on top.
"""
from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "templates"
FAMILIES: dict[str, dict[str, Any]] = json.loads((FIXTURES / "families.json").read_text(encoding="utf-8"))
# the split regex of Llama 3 / Qwen2 / OLMo 2 / Mistral's tekken style tokenizers (GPT-4's, cl100k)
MODERN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=4)
def _vocab(name: str) -> str:
    """The tokenizer.json text of one shipped vocabulary."""
    return gzip.decompress((FIXTURES / "vocab" / f"{name}.json.gz").read_bytes()).decode("utf-8")


def make_tokenizer(family: str) -> Any:
    """A fresh HF fast tokenizer of `family`: its real template on a real vocabulary, specials added."""
    from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    raw = Tokenizer.from_str(_vocab(spec["vocab"]))
    if spec["vocab"] == "gpt-2":
        raw.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(MODERN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.get("specials", [])])
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.get("added", [])])
    template = (FIXTURES / "jinja" / spec["template"]).read_text(encoding="utf-8")
    kwargs = {k: spec[k] for k in ("bos", "eos", "pad") if k in spec}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=template,
                                        **{f"{k}_token": v for k, v in kwargs.items()})
    if spec["vocab"] != "gpt-2":
        tokenizer.unk_token = "<unk>"
    return tokenizer
