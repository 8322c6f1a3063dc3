"""llama.cpp greedy decoding speed on an exported GGUF (needs llama-cpp-python: `tunesmith[llama]`).

    python bench/gguf_speed.py my-run/export-gguf/my-run-q4_k_m.gguf [--threads 2] [--new-tokens 128]

Each prompt is rendered with the chat template stored in the file (llama-cpp-python's jinja
formatter, what `create_chat_completion` uses) and decoded greedily for exactly `--new-tokens`
tokens, end-of-turn ignored, so every run decodes the same number of tokens; prompt
processing (up to the first token) and decoding (the rest) are timed apart, by wall clock.
Also prints the reply to the first prompt, stopped at end-of-turn as chat mode does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

PROMPTS = ["Tell me about the river and the stone.", "Write a tweet about the moon.", "What is two plus two?",
           "Translate the word bird.", "Why is the sky blue?"]


def decode(llm: Any, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
    """(prompt seconds, decode seconds, tokens decoded after the first) of one fixed-length greedy run.

    Wall clock around llama-cpp-python's token generator: the first token arrives after the
    prompt is processed; the rest are one decode step (plus the bindings' sampling) each.
    """
    start = time.perf_counter()
    first = start
    for n, _token in enumerate(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True), start=1):
        if n == 1:
            first = time.perf_counter()
        if n == new_tokens:
            break
    return first - start, time.perf_counter() - first, new_tokens - 1


def main() -> None:
    """Load the GGUF once, time each prompt, print a summary (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=512, n_threads=args.threads, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos, eos = (llm.detokenize([t], special=True).decode("utf-8", "replace") for t in (llm.token_bos(), llm.token_eos()))
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], bos_token=bos, eos_token=eos)
    prompts = [llm.tokenize(formatter(messages=[{"role": "user", "content": p}]).prompt.encode(), add_bos=False,
                            special=True) for p in PROMPTS]
    decode(llm, prompts[0], 8)  # warm-up
    runs = [decode(llm, p, args.new_tokens) for p in prompts]
    decode_tps = statistics.median(n / seconds for _, seconds, n in runs)
    prompt_tps = statistics.median(len(p) / seconds for p, (seconds, _, _) in zip(prompts, runs))
    reply = []
    for token in llm.generate(prompts[0], top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(reply) == args.new_tokens:
            break
        reply.append(token)
    result = {"gguf": args.gguf, "threads": args.threads, "new_tokens": args.new_tokens,
              "decode_tokens_per_s": round(decode_tps, 1), "prompt_tokens_per_s": round(prompt_tps, 1),
              "first_reply": llm.detokenize(reply).decode("utf-8", "replace")}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.gguf}: greedy decode {decode_tps:.1f} tokens/s, prompt {prompt_tps:.1f} tokens/s "
          f"({args.threads} threads, {args.new_tokens} new tokens, median of {len(PROMPTS)} prompts)")
    print(f"reply to {PROMPTS[0]!r}: {result['first_reply']!r}")


if __name__ == "__main__":
    main()
