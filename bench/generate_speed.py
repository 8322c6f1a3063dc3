"""Generation speed: tunesmith's `generate_batch` vs `transformers.pipeline`, same model, same run.

    python bench/generate_speed.py                      # tiny random model on CPU
    python bench/generate_speed.py --shape llama-1b     # Llama-3.2-1B-shaped random model (use a GPU)
    python bench/generate_speed.py --model DIR          # any model tunesmith can load

Both sides decode greedily, `--new-tokens` at most, after one warm-up call; tokens/s is
generated tokens (end-of-turn tokens included, padding excluded) over wall time, the
median of `--repeats` runs, for batch size 1 and `--batch`. Prints a table, and JSON
with --json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Tell me about the river and the stone.", "Write a tweet about the moon.",
           "What is two plus two?", "Translate the word bird.", "Why is the sky blue?",
           "Tell me a small story about a quick red fish.", "Hello!", "How are you today?"]
SHAPES = {  # LlamaConfig keyword arguments
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """A random Llama of `shape` with the tests' tiny chat tokenizer (ids beyond it decode to nothing)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny.make_tokenizer("llama3")
    kwargs = {"vocab_size": len(tokenizer), **SHAPES[shape]}
    config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def timed(fn: Any, repeats: int, device: torch.device) -> tuple[float, int]:
    """Median seconds of `fn()` over `repeats` runs after one warm-up, and the tokens it returns."""
    fn()
    times, tokens = [], 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def tunesmith_run(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int) -> int:
    """Generate with tunesmith; return the number of generated tokens."""
    from tunesmith.infer.generate import generate_batch
    from tunesmith.infer.sampling import SamplingOptions

    out = generate_batch(model, tokenizer, prompts, SamplingOptions(greedy=True, max_new_tokens=new_tokens),
                         batch_size=len(prompts))
    return sum(len(c.token_ids) for c in out)


def pipeline_run(pipe: Any, tokenizer: Any, prompts: list[str], new_tokens: int) -> int:
    """Generate with transformers.pipeline on the same chat-rendered prompts; count generated tokens."""
    messages = [[{"role": "user", "content": p}] for p in prompts]
    out = pipe(messages, max_new_tokens=new_tokens, do_sample=False, return_tensors=True,
               batch_size=len(prompts))
    count = 0
    for result, message in zip(out, messages):
        ids = list(result[0]["generated_token_ids"])
        while ids and ids[0] == tokenizer.pad_token_id:  # the batch's left padding
            ids.pop(0)
        prompt = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True)
        prompt_len = len(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)  # BatchEncoding or list
        new = list(ids[prompt_len:])
        count += len([t for t in new if t != tokenizer.pad_token_id]) or len(new)
    return count


def main() -> None:
    """Parse flags, build or load the model, time both sides, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory or hub id (default: a random model of --shape)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: the training policy's choice)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (tiny models are fastest on 1; default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()

    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from tunesmith.model.load import load_model, load_tokenizer, pick_device_dtype

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = pick_device_dtype(args.device)
    if args.model:
        model, tokenizer = load_model(args.model, device=device, dtype=dtype, merge_adapter=True).eval(), \
            load_tokenizer(args.model)
    else:
        model, tokenizer = random_model(args.shape, device, dtype)
    tokenizer.padding_side = "left"  # the pipeline's batches need it; tunesmith pads left by itself
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device=device)
    rows = []
    for batch in sorted({1, args.batch}):
        prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
        for name, run in (("tunesmith", lambda: tunesmith_run(model, tokenizer, prompts, args.new_tokens)),
                          ("pipeline", lambda: pipeline_run(pipe, tokenizer, prompts, args.new_tokens))):
            seconds, tokens = timed(run, args.repeats, device)
            rows.append({"impl": name, "batch": batch, "tokens": tokens, "seconds": round(seconds, 4),
                         "tokens_per_s": round(tokens / seconds, 1)})
    label = args.model or f"random {args.shape}"
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {label} ({params / 1e6:.1f}M params), {device.type} {str(dtype).removeprefix('torch.')}, "
          f"max {args.new_tokens} new tokens, greedy, threads={torch.get_num_threads()}")
    print(f"{'impl':<10} {'batch':>5} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for row in rows:
        print(f"{row['impl']:<10} {row['batch']:>5} {row['tokens']:>7} {row['seconds']:>8.3f} "
              f"{row['tokens_per_s']:>9.1f}")
    if args.json:
        print(json.dumps({"model": label, "device": device.type, "rows": rows}))


if __name__ == "__main__":
    main()
