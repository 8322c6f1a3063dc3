"""Build tests/fixtures/templates/vocab/*.json.gz from llama.cpp's real vocabularies (run once, offline).

    python scripts/build_template_fixtures.py /path/to/llama.cpp/models

Each `ggml-vocab-NAME.gguf` (a real model vocabulary without weights, published in llama.cpp's
repository) is read with transformers' GGUF support (needs the `gguf` package) and written as a
minified, gzipped tokenizer.json. Only the vocabularies under 4 MB are used (llama-spm, phi-3,
gpt-2); the families whose own vocabulary is larger share one of these plus their own special
tokens (tests/fixtures/templates/families.json says which).
"""
from __future__ import annotations

import gzip
import sys
import tempfile
from pathlib import Path

VOCABS = ("llama-spm", "phi-3", "gpt-2")
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "templates" / "vocab"


def convert(models: Path, name: str) -> bytes:
    """The tokenizer.json (minified) of one GGUF vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models), gguf_file=f"ggml-vocab-{name}.gguf")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.backend_tokenizer.save(str(Path(tmp) / "tokenizer.json"), pretty=False)
        return (Path(tmp) / "tokenizer.json").read_bytes()


def main(models: Path) -> None:
    """Write one gzipped tokenizer.json per vocabulary."""
    OUT.mkdir(parents=True, exist_ok=True)
    for name in VOCABS:
        data = gzip.compress(convert(models, name), compresslevel=9, mtime=0)
        (OUT / f"{name}.json.gz").write_bytes(data)
        print(f"{name}: {len(data) / 1e6:.2f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
