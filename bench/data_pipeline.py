"""CPU benchmark of the data side: read + template + tokenize N synthetic Alpaca samples.

    python bench/data_pipeline.py [--samples 50000] [--model DIR] [--read-rows 1000000]

Target (issue 2): 50,000 Alpaca-sized samples in under 20 s on 2 CPU cores. Uses the
bundled starter model's tokenizer when present (or --model), else a byte-level BPE
tokenizer with Llama-3-style specials trained on the fly (like tests/tiny.py, 8k vocab).
Prints one line per stage and the end-to-end samples/s.

`--read-rows N` (issue 12) then reads an N-row JSONL file (and its .gz) in a fresh
process and prints rows/s and the peak resident memory, next to the file's size and what
the conversations themselves hold: the reader streams, so the peak is the kept samples
plus a bounded buffer, never the file's text, its decoded rows and the samples at once.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = ("the a of to and in is it you that he was for on are with as I his they be at one have this "
         "from or had by word but what some we can out other were all there when up use your how said an "
         "each she which do their time if will way about many then them write would like so these her long "
         "make thing see him two has look more day could go come did number sound no most people my over "
         "know water than call first who may down side been now find any new work part take get place made "
         "live where after back little only round man year came show every good me give our under name very "
         "through just form sentence great think say help low line differ turn cause much mean before move "
         "right boy old too same tell does set three want air well also play small end put home read hand").split()

LLAMA3_STYLE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def sentence(rng: random.Random, n: int) -> str:
    """`n` random words with some punctuation and digits."""
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + rng.choice([".", "!", "?"]) + f" {rng.randint(0, 9999)}"


def alpaca_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-sized rows: ~20-word instruction, input empty 60% of the time, ~60-word output."""
    rng = random.Random(seed)
    return [{"instruction": sentence(rng, rng.randint(8, 30)),
             "input": "" if rng.random() < 0.6 else sentence(rng, rng.randint(5, 40)),
             "output": sentence(rng, rng.randint(20, 120))} for _ in range(n)]


def bench_tokenizer(model: str | None) -> Any:
    """The starter's (or --model's) tokenizer, else a fresh 8k BPE with Llama-3 specials."""
    from tunesmith.model.load import STARTER_DIR, load_tokenizer

    if model and (Path(model) / "tokenizer_config.json").is_file():  # a bare tokenizer directory
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)
    if model or (STARTER_DIR / "config.json").is_file():
        return load_tokenizer(model)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((r["output"] for r in alpaca_rows(5000, seed=1)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=LLAMA3_STYLE)


def _child_read(path: str) -> int:
    """(In a fresh process) read `path`; print seconds, rows and peak RSS as JSON."""
    import resource

    from tunesmith.data.readers import read_conversations

    base = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024  # now, KiB
    start = time.perf_counter()
    convs, report = read_conversations(path)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": seconds, "rows": len(convs), "peak_mib": peak / 1024, "base_mib": base / 1024}))
    return 0


def bench_read_rows(rows: int) -> None:
    """Write an N-row JSONL file (and a gzip of it), read each in a fresh process, print rows/s and peak RSS."""
    import gzip
    import shutil
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for start in range(0, rows, 50_000):
                batch = alpaca_rows(min(50_000, rows - start), seed=start)
                out.write("".join(json.dumps(r) + "\n" for r in batch))
        with path.open("rb") as src, gzip.open(f"{path}.gz", "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)
        for name in (path, Path(f"{path}.gz")):
            size = name.stat().st_size / 2**20
            done = subprocess.run([sys.executable, __file__, "--child-read", str(name)], capture_output=True,
                                  text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"read {r['rows']:,} rows of {name.name} ({size:,.0f} MiB): {r['seconds']:6.1f} s "
                  f"({r['rows'] / r['seconds']:,.0f} rows/s); peak RSS {r['peak_mib']:,.0f} MiB "
                  f"({r['base_mib']:,.0f} MiB after imports; {(r['peak_mib'] - r['base_mib']) * 2**20 / r['rows']:,.0f} "
                  "bytes per kept sample)")


def main(argv: list[str] | None = None) -> int:
    """Time each stage on synthetic data and print samples/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--model", default=None, help="tokenizer to use (default: starter, else synthetic)")
    parser.add_argument("--read-rows", type=int, default=0, help="also stream-read a file of this many rows")
    parser.add_argument("--child-read", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_read:
        return _child_read(args.child_read)

    from tunesmith.data.readers import read_conversations
    from tunesmith.data.templates import choose_template
    from tunesmith.data.tokenize import tokenize_all

    tokenizer = bench_tokenizer(args.model)
    print(f"{os.cpu_count()} CPU cores visible; load average {os.getloadavg()[0]:.1f} (other work skews wall times)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "alpaca.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(args.samples)), encoding="utf-8")
        start = time.perf_counter()
        convs, _ = read_conversations(str(path))
        read_s = time.perf_counter() - start
    template = choose_template(tokenizer, "auto")
    start, cpu_start = time.perf_counter(), time.process_time()
    samples, report = tokenize_all(convs, tokenizer, max_length=2048)
    tok_s, tok_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    total = read_s + tok_s
    tokens = sum(len(s.input_ids) for s in samples)
    print(f"tokenizer: {getattr(tokenizer, 'name_or_path', '') or 'synthetic 8k BPE'} (template {template})")
    print(f"read+validate:     {read_s:6.2f} s  ({len(convs) / read_s:,.0f} samples/s)")
    print(f"template+tokenize: {tok_s:6.2f} s  ({len(samples) / tok_s:,.0f} samples/s, {tokens / tok_s:,.0f} tokens/s; "
          f"{tok_cpu:.2f} CPU-s over all threads)")
    print(f"total:             {total:6.2f} s  for {len(samples):,} samples, {tokens / len(samples):.0f} tokens "
          f"each -> {len(samples) / total:,.0f} samples/s (target: 50,000 in < 20 s = 2,500 samples/s)")
    if args.read_rows:
        bench_read_rows(args.read_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
