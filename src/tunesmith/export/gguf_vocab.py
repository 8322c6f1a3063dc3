"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), so llama.cpp splits text into the same ids.

A GGUF has no tokenizer.json: llama.cpp rebuilds the tokenizer from a token list, token
types, merges (byte-level BPE) or scores (SentencePiece-style), and a *pre-tokenizer name*
that selects one of the regexes compiled into llama.cpp. We read everything from the HF
fast tokenizer's own JSON, and name the pre-tokenizer by matching its split regex against
the ones llama.cpp knows; an unknown regex is refused rather than guessed, because a wrong
split gives different ids for ordinary text without any error.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tunesmith.errors import UserError

# Split regexes of the byte-level BPE families we export, and llama.cpp's name for each.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}

# gguf.TokenType values (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GgufVocab:
    """Everything llama.cpp needs to tokenize like the HF tokenizer."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback)
    pre: str | None  # llama.cpp's pre-tokenizer name (byte-level BPE only)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]


def _split_regex(pre: dict[str, Any] | None) -> tuple[str | None, bool]:
    """(the Split regex of a pre-tokenizer, whether a ByteLevel step uses GPT-2's built-in regex)."""
    if not pre:
        return None, False
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regex, gpt2 = None, False
    for step in steps:
        if step.get("type") == "Split":
            regex = step.get("pattern", {}).get("Regex")
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            gpt2 = True
    return regex, gpt2


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the way this byte-level BPE tokenizer splits text before merging."""
    regex, gpt2 = _split_regex(tokenizer_json.get("pre_tokenizer"))
    if regex is None and gpt2:
        return "gpt-2"  # ByteLevel(use_regex=True): GPT-2's own pattern
    if regex in PRE_TOKENIZERS and not gpt2:
        return PRE_TOKENIZERS[regex]
    raise UserError("GGUF export: this tokenizer splits text with a pre-tokenizer llama.cpp is not known to have",
                    [f"pre_tokenizer: {json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]}",
                     "supported: GPT-2, Llama 3 and Qwen2 byte-level BPE, and SentencePiece-style BPE; "
                     "`--to merged` works for any tokenizer"])


def _merges(model: dict[str, Any]) -> list[str]:
    """Merges as "a b" strings (tokenizer.json stores them as pairs or as strings)."""
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _token_types(tokenizer: Any, tokens: list[str], byte_fallback: bool) -> list[int]:
    """CONTROL for special added tokens, USER_DEFINED for other added ones, BYTE for <0xNN>."""
    types = [NORMAL] * len(tokens)
    for idx, added in tokenizer.added_tokens_decoder.items():
        if idx < len(types):
            types[idx] = CONTROL if added.special else USER_DEFINED
    for idx, text in enumerate(tokens):
        if byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types[idx] = BYTE
        elif text.startswith("[PAD") and text.endswith("]") and idx >= len(tokenizer):
            types[idx] = UNUSED
    if tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = UNKNOWN
    return types


def _spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Scores for llama.cpp's SentencePiece merger: a token made by merge rank r scores -r.

    llama.cpp's "llama" tokenizer repeatedly merges the adjacent pair whose result scores
    highest; scoring each token by minus the rank of the merge that creates it makes that
    the same order as the BPE merges (base symbols score 0 and are never merge results).
    """
    rank = {a + b: -float(i + 1) for i, (a, _, b) in enumerate(m.partition(" ") for m in merges)}
    return [rank.get(t, 0.0) for t in tokens]


def vocab_of(tokenizer: Any, vocab_size: int) -> GgufVocab:
    """The GGUF vocabulary of an HF fast tokenizer, padded to the model's embedding rows."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("GGUF export needs a fast tokenizer (tokenizer.json); this one is a slow tokenizer")
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export: {model.get('type')} tokenizers are not supported (only BPE)",
                        ["`--to merged` works for any tokenizer"])
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise UserError(f"GGUF export: the tokenizer has {len(by_id)} tokens but the model only {vocab_size} "
                        "embedding rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    byte_fallback = bool(model.get("byte_fallback"))
    merges = _merges(model)
    types = _token_types(tokenizer, tokens, byte_fallback)
    if byte_fallback:
        return GgufVocab("llama", None, tokens, types, _spm_scores(tokens, merges), merges)
    return GgufVocab("gpt2", pre_tokenizer_name(tj), tokens, types, None, merges)


def adds_bos(tokenizer: Any) -> bool:
    """Whether plain encoding prepends BOS (llama.cpp's `add_bos_token` must agree)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def adds_space_prefix(tokenizer: Any) -> bool:
    """Whether SentencePiece-style encoding puts "▁" before the first word (Llama 2, Mistral: yes; Gemma: no)."""
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    text = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    prepends = '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)
    return prepends


def write_vocab(writer: Any, tokenizer: Any, vocab_size: int, end_of_turn_ids: list[int]) -> GgufVocab:
    """Write the `tokenizer.ggml.*` keys, special ids (EOS/EOT from the end-of-turn ids) and the template."""
    vocab = vocab_of(tokenizer, vocab_size)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(adds_space_prefix(tokenizer))
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (end_of_turn_ids or [None])[0]
    if eos is not None:
        writer.add_eos_token_id(int(eos))
    if end_of_turn_ids:
        writer.add_eot_token_id(int(end_of_turn_ids[0]))  # the token that closes an assistant turn
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template.strip():
        writer.add_chat_template(template)
    return vocab
