"""Real chat templates on real vocabularies, for the per-family tests (no network).

tests/fixtures/templates/ holds the models' chat templates (jinja/), seven real vocabularies converted
from llama.cpp's ggml-vocab-*.gguf, Mistral 7B's own SentencePiece model and Phi-4's (cl100k_base with
its own tokens) (vocab/, built by
scripts/build_template_fixtures.py and checked against llama.cpp's tokenizer test cases by
tests/test_template_vocabs.py) and families.json: per
family its template, vocabulary, special tokens and the end-of-turn token its tokenizer_config /
generation_config declare.

A family on its own model's vocabulary (Llama 3.x, Qwen2.5/3, QwQ, the R1 distills, SmolLM3,
Command R, Phi-3.5, Phi-4, TinyLlama, Mistral 7B) gets that vocabulary with the family's special tokens where the model
has them: `rename` gives a reserved token the family's name for it (Llama 3.1's `<|eom_id|>` is Llama
3's `<|reserved_special_token_4|>`), `specials`/`added` are appended in order, and `ids` lists ids the
real model's tokenizer has, which tests/test_template_vocabs.py checks. Families whose vocabulary is
not shipped (`"stand_in": true`) share gpt-2's byte-level BPE (split with the GPT-4-style regex the
modern families use) or Llama 2's SentencePiece, with their own special tokens added on top.
"""
from __future__ import annotations

import atexit
import functools
import gzip
import json
import lzma
import shutil
import tempfile
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "templates"
FAMILIES: dict[str, dict[str, Any]] = json.loads((FIXTURES / "families.json").read_text(encoding="utf-8"))
VOCABS = ("gpt-2", "llama-spm", "phi-3", "mistral-spm", "llama-bpe", "qwen2", "command-r", "starcoder", "phi-4")
# the split regex of Llama 3 / OLMo 2 / Mistral's tekken style tokenizers (GPT-4's, cl100k)
MODERN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.cache
def vocab_text(name: str) -> str:
    """The tokenizer.json text of one shipped vocabulary (decompressed once per test session)."""
    xz = FIXTURES / "vocab" / f"{name}.json.xz"
    if xz.exists():
        return lzma.decompress(xz.read_bytes()).decode("utf-8")
    return gzip.decompress((FIXTURES / "vocab" / f"{name}.json.gz").read_bytes()).decode("utf-8")


def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test cases of one vocabulary: (text, the ids the model's own tokenizer gives)."""
    raw = (FIXTURES / "vocab" / f"{name}.inp").read_bytes().decode("utf-8")
    texts = raw.split("\n__ggml_vocab_test__\n")[:-1]
    ids = (FIXTURES / "vocab" / f"{name}.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(texts) == len(ids), name
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]


@functools.cache
def tokenizer_file(vocab: str, renames: tuple[tuple[str, str], ...] = (), dummy_prefix: bool = True) -> str:
    """A tokenizer.json of a vocabulary with reserved tokens renamed, written once per test session
    (loading from a file parses the 5-10 MB of a big vocabulary once; a tokenizer object would be
    deep-copied by transformers, which costs a second parse)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    text = vocab_text(vocab)
    for old, new in renames:  # a reserved token's string: in the vocab, in added_tokens (and the BOS template)
        quoted_old, quoted_new = json.dumps(old), json.dumps(new)
        assert text.count(quoted_old) >= 2 and quoted_new not in text, (vocab, old, new)  # (+ BOS post-processor)
        text = text.replace(quoted_old, quoted_new)
    raw = Tokenizer.from_str(text)
    if not dummy_prefix:  # Gemma's SentencePiece adds no "▁" before a segment (Llama 2's does, after every special)
        raw.normalizer = normalizers.Replace(" ", "\u2581")
    if vocab == "gpt-2":
        raw.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(MODERN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    path = Path(tempfile.mkdtemp(prefix="tunesmith-vocab-")) / f"{vocab}.json"
    atexit.register(shutil.rmtree, path.parent, True)
    raw.save(str(path), pretty=False)
    return str(path)


@functools.cache
def make_tokenizer(family: str) -> Any:
    """The HF fast tokenizer of `family`: its real template on a real vocabulary, specials in place.

    Built once per test session and shared: tests must not change it (copy.deepcopy it first)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    path = tokenizer_file(spec["vocab"], tuple(tuple(pair) for pair in spec.get("rename", {}).items()),
                          spec.get("dummy_prefix", True))
    template = (FIXTURES / "jinja" / spec["template"]).read_text(encoding="utf-8")
    kwargs = {f"{k}_token": spec[k] for k in ("bos", "eos", "pad") if k in spec}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=path, chat_template=template, **kwargs)
    tokenizer.backend_tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in spec.get("specials", [])])
    tokenizer.backend_tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in spec.get("added", [])])
    if spec["vocab"] in ("llama-spm", "phi-3", "mistral-spm"):
        tokenizer.unk_token = "<unk>"
    return tokenizer


def family_model_dir(root: Path, family: str) -> Path:
    """ROOT/FAMILY: a real family's tokenizer (template + vocabulary) and a config, so it loads as a model directory."""
    from transformers import LlamaConfig

    tok = make_tokenizer(family)
    tok.save_pretrained(root / family)
    LlamaConfig(vocab_size=len(tok)).save_pretrained(root / family)
    return root / family
