"""Build tests/fixtures/templates/vocab/ from llama.cpp's real vocabularies (run once, offline).

    python scripts/build_template_fixtures.py /path/to/llama.cpp/models
    python scripts/build_template_fixtures.py --mistral /path/to/tokenizer.model.v1
    python scripts/build_template_fixtures.py --phi4 /path/to/cl100k_base.tiktoken

Each `ggml-vocab-NAME.gguf` in llama.cpp's repository is a real model's vocabulary without
weights, with `.inp`/`.out` files beside it: test strings and the ids the model's own Hugging Face
tokenizer gives them. Two kinds of conversion:

- SentencePiece vocabularies (llama-spm, phi-3) and gpt-2 go through transformers' GGUF support
  (needs the `gguf` package) and are stored as gzipped tokenizer.json (as before).
- The byte-level BPE vocabularies of the modern families (llama-bpe = Llama 3, qwen2 = Qwen1.5-3,
  command-r = Command R, starcoder = StarCoder2, which Granite 3's is built on) are rebuilt here
  from the GGUF's tokens and merges, with the split regex the GGUF names in `tokenizer.ggml.pre` (transformers' GGUF loader ignores that key, and the
  regex decides where BPE words end), and stored as xz-compressed tokenizer.json. llama.cpp's
  padding rows (`[PAD<id>]`) are dropped, so a family's own extra tokens take their real ids.

The `.inp`/`.out` pairs are copied next to the vocabularies; tests/test_template_vocabs.py checks
that every converted vocabulary reproduces them exactly.

Mistral 7B's own SentencePiece model (`tokenizer.model.v1` in the mistral-common wheel: Mistral 7B
v0.1/v0.2, 32000 pieces) is not in llama.cpp; `--mistral` converts it as transformers converts
Mistral's slow tokenizer (LlamaConverter, legacy, BOS before the text) and writes its `.out` with
the `sentencepiece` library itself (needs `sentencepiece` and `protobuf`; neither is a project or
test dependency).

Phi-4's vocabulary is OpenAI's cl100k_base BPE (not in llama.cpp) with Phi-4's own special tokens at
100256-100351. `--phi4` converts a local `cl100k_base.tiktoken` (checked against tiktoken's published
sha256) with transformers' TikTokenConverter (ranks -> merges, cl100k's split regex), appends those
tokens, and writes its `.out` with tiktoken itself (`encode_ordinary`; needs `tiktoken`, which is not a
project or test dependency).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

SPM_VOCABS = ("llama-spm", "phi-3", "gpt-2")
BPE_VOCABS = ("llama-bpe", "qwen2", "command-r", "starcoder")
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "templates" / "vocab"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# the split regex of each `tokenizer.ggml.pre` (as in the models' own tokenizer.json), and whether
# the model's tokenizer normalizes to NFC and looks a whole word up before merging (tiktoken style)
PRE: dict[str, dict[str, Any]] = {
    "llama-bpe": {"split": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+", "nfc": False, "ignore_merges": True},
    "qwen2": {"split": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+", "nfc": True, "ignore_merges": False},
    "command-r": {"digits": True, "nfc": True, "ignore_merges": False},  # digits apart, then GPT-2's split
    "starcoder": {"digits": True, "nfc": False, "ignore_merges": False},
}


def convert_spm(models: Path, name: str) -> bytes:
    """The tokenizer.json (minified) of one GGUF vocabulary, through transformers' GGUF loader.

    For llama-spm that loader writes a Metaspace pre-tokenizer, which adds no "▁" before text that
    already starts with a space; Llama 2's own tokenizer.json always prepends one (" Hello" is
    "▁", "▁Hello"), as llama.cpp's test ids show, so its normalizer is put back (phi-3's has it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models), gguf_file=f"ggml-vocab-{name}.gguf")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.backend_tokenizer.save(str(Path(tmp) / "tokenizer.json"), pretty=False)
        data = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
    if data["pre_tokenizer"] and data["pre_tokenizer"]["type"] == "Metaspace":
        data["pre_tokenizer"] = None
        data["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def convert_bpe(models: Path, name: str) -> bytes:
    """The tokenizer.json (minified) of one byte-level BPE GGUF vocabulary, split as its model splits."""
    import gguf
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers import models as tk_models

    fields = gguf.GGUFReader(models / f"ggml-vocab-{name}.gguf").fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    pre = PRE[fields["tokenizer.ggml.pre"].contents()]
    keep = [(t, kind) for i, (t, kind) in enumerate(zip(tokens, types)) if not (kind == 4 and t == f"[PAD{i}]")]
    vocab = {t: i for i, (t, _) in enumerate(keep)}
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    tokenizer = Tokenizer(tk_models.BPE(vocab=vocab, merges=merges, ignore_merges=pre["ignore_merges"]))
    if pre["nfc"]:
        tokenizer.normalizer = normalizers.NFC()
    if "split" in pre:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pre["split"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _bos_template(fields, tokens)
    # control tokens (type 3) are special; user-defined ones (type 4) are added tokens, matched whole
    tokenizer.add_tokens([AddedToken(t, special=kind == 3, normalized=False) for t, kind in keep if kind in (3, 4)])
    return tokenizer.to_str(pretty=False).encode("utf-8")


def _bos_template(fields: Any, tokens: list[str]) -> Any:
    """The post-processor that puts BOS before `encode(text)`, where the model's own tokenizer does
    (the GGUF's add_bos_token; llama.cpp sets it for Llama 3's pre-tokenizer); None where it does not."""
    add = fields["tokenizer.ggml.add_bos_token"].contents() if "tokenizer.ggml.add_bos_token" in fields else False
    if not (add or fields["tokenizer.ggml.pre"].contents() == "llama-bpe"):
        return None
    bos_id = int(fields["tokenizer.ggml.bos_token_id"].contents())
    return bos_processor(tokens[bos_id], bos_id)


def convert_mistral(model: Path) -> bytes:
    """The tokenizer.json (minified) of Mistral 7B's SentencePiece model, as transformers converts it.

    transformers 5's SpmConverter hands the piece scores to an extractor that now expects a model
    type, so the extractor is the v4 one (merges ranked by piece score, as SentencePiece's BPE
    merges). The post-processor puts <s> first, as Mistral's LlamaTokenizerFast does (add_bos_token);
    <unk> is a special added token there too."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import LlamaConverter
    from transformers.tokenization_utils_base import generate_merges
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class ScoreRankedExtractor:
        def __init__(self, path: str) -> None:
            self.sp = spm.SentencePieceProcessor(model_file=path)

        def extract(self, vocab_scores: list[tuple[str, float]]) -> tuple[dict[str, int], list[tuple[str, str]]]:
            vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
            return vocab, generate_merges(vocab, vocab_scores)

    class MistralConverter(LlamaConverter):
        SpmExtractor = ScoreRankedExtractor

    slow = SentencePieceBackend(vocab_file=str(model), legacy=True, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    slow.add_prefix_space = True  # Mistral's tokenizer_config: legacy, dummy prefix (LlamaTokenizer's defaults)
    tokenizer = MistralConverter(slow).converted()
    tokenizer.add_special_tokens([AddedToken("<unk>", special=True, normalized=False)])
    tokenizer.post_processor = bos_processor("<s>", 1)
    return tokenizer.to_str(pretty=False).encode("utf-8")


def bos_processor(bos: str, bos_id: int) -> Any:
    """A post-processor that puts `bos` before every encoded text (and before each of a pair)."""
    from tokenizers import processors

    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])


def mistral_cases(model: Path, texts: list[str]) -> str:
    """The `.out` text of llama.cpp's test strings under Mistral's model, from `sentencepiece` itself.

    Ids are written without the BOS, like llama.cpp's `.out` files; sentencepiece's add_bos=True gives
    <s> (1) and then exactly these, which the test asks of encode() with special tokens."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert (sp.vocab_size(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (32000, 0, 1, 2), "not Mistral 7B's v1 model"
    assert sp.piece_to_id("[INST]") == sp.unk_id(), "[INST] is a piece: a v2+ (instruct) model, not v1"
    lines = []
    for text in texts:
        with_bos = sp.encode(text, add_bos=True)
        assert with_bos[0] == sp.bos_id()
        lines.append("".join(f" {i}" for i in with_bos[1:]))
    return "\n".join(lines) + "\n"


def write_vocab_fixture(name: str, tokenizer_json: bytes, inp_from: str, ids_for: Any) -> None:
    """NAME.json.xz, and its test cases: llama.cpp's strings of INP_FROM.inp with the ids
    `ids_for(texts)` gives (the reference tokenizer, outside transformers) as NAME.out."""
    path = OUT / f"{name}.json.xz"
    path.write_bytes(lzma.compress(tokenizer_json, preset=9 | lzma.PRESET_EXTREME))
    print(f"{name}: {path.stat().st_size / 1e6:.2f} MB")
    raw = (OUT / f"{inp_from}.inp").read_bytes()
    (OUT / f"{name}.inp").write_bytes(raw)
    texts = raw.decode("utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    (OUT / f"{name}.out").write_text(ids_for(texts), encoding="utf-8")


def build_mistral(model: Path) -> None:
    """Write mistral-spm.json.xz and its test cases (llama.cpp's strings, sentencepiece's ids)."""
    write_vocab_fixture("mistral-spm", convert_mistral(model), "llama-spm", lambda texts: mistral_cases(model, texts))


# tiktoken_ext/openai_public.py (tiktoken 0.14.0): where cl100k_base is published and its sha256
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def phi4_specials() -> dict[str, int]:
    """Phi-4's added tokens and their ids, as pytorch/torchtune's phi4 tokenizer lays them out
    (torchtune/models/phi4/_tokenizer.py): cl100k's own <|endoftext|>, FIM and <|endofprompt|> ids,
    ChatML's three at 100264-100266, and <|dummy_N|> fillers in every other slot up to 100351."""
    named = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
             "<|im_start|>": 100264, "<|im_end|>": 100265, "<|im_sep|>": 100266, "<|endofprompt|>": 100276}
    by_id, dummy = {i: t for t, i in named.items()}, 0
    for i in range(100256, 100352):
        if i not in by_id:
            by_id[i], dummy = f"<|dummy_{dummy}|>", dummy + 1
    return {by_id[i]: i for i in sorted(by_id)}


def cl100k_encoding(ranks_file: Path) -> Any:
    """tiktoken's own cl100k_base, read offline from `ranks_file` (tiktoken checks its sha256 too)."""
    import tiktoken

    data = ranks_file.read_bytes()
    assert hashlib.sha256(data).hexdigest() == CL100K_SHA256, "not tiktoken's cl100k_base.tiktoken"
    cache = Path(tempfile.mkdtemp(prefix="cl100k-"))
    (cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(data)  # tiktoken's cache layout
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    encoding = tiktoken.get_encoding("cl100k_base")
    assert encoding.n_vocab == 100277 and len(data.splitlines()) == 100256
    return encoding


def convert_phi4(ranks_file: Path) -> bytes:
    """The tokenizer.json (minified) of Phi-4: cl100k's ranks as byte-level BPE merges (transformers'
    TikTokenConverter, whole words looked up first as tiktoken does), Phi-4's tokens appended as special."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tokenizer = TikTokenConverter(vocab_file=str(ranks_file)).converted()
    assert tokenizer.get_vocab_size() == 100256
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in phi4_specials()])
    for token, i in phi4_specials().items():
        assert tokenizer.token_to_id(token) == i, token
    return tokenizer.to_str(pretty=False).encode("utf-8")


def build_phi4(ranks_file: Path) -> None:
    """Write phi-4.json.xz and its test cases (llama.cpp's strings, tiktoken's cl100k ids)."""
    encoding = cl100k_encoding(ranks_file)

    def ids_for(texts: list[str]) -> str:
        return "\n".join("".join(f" {i}" for i in encoding.encode_ordinary(text)) for text in texts) + "\n"

    write_vocab_fixture("phi-4", convert_phi4(ranks_file), "llama-bpe", ids_for)


def main(models: Path) -> None:
    """Write the vocabularies that are not there yet, and copy their tokenizer test cases."""
    OUT.mkdir(parents=True, exist_ok=True)
    for name in SPM_VOCABS:
        path = OUT / f"{name}.json.gz"
        if name == "llama-spm" or not path.exists():
            path.write_bytes(gzip.compress(convert_spm(models, name), compresslevel=9, mtime=0))
        print(f"{name}: {path.stat().st_size / 1e6:.2f} MB")
    for name in BPE_VOCABS:
        path = OUT / f"{name}.json.xz"
        path.write_bytes(lzma.compress(convert_bpe(models, name), preset=9 | lzma.PRESET_EXTREME))
        print(f"{name}: {path.stat().st_size / 1e6:.2f} MB")
    for name in SPM_VOCABS + BPE_VOCABS:
        for ext in ("inp", "out"):
            shutil.copyfile(models / f"ggml-vocab-{name}.gguf.{ext}", OUT / f"{name}.{ext}")


if __name__ == "__main__":
    if sys.argv[1] == "--mistral":
        build_mistral(Path(sys.argv[2]))
    elif sys.argv[1] == "--phi4":
        build_phi4(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
