"""Per-document causal attention on packed rows: flex attention's kernel settings vs FlashAttention varlen.

Why: on the Llama-3.2-1B shape at 8,192 tokens of short samples, flex attention's forward and
backward take ~12 ms of a ~100 ms LoRA step (the round-6 profile: 13.7% of GPU time) for
about 1.5 TFLOP of work inside the documents: ~10x slower than the matmuls around it. This
times one attention call (forward + backward, one layer's shape) over the bench's own packed
rows, in each form the fast path could use, and checks each against flex's default output and
gradients:

- flex, default kernel settings (what the fast path runs now: transformers passes no
  `kernel_options`);
- flex with explicit tile sizes / warps / stages (`kernel_options`, which transformers passes
  through from the decoder call's kwargs);
- `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 inside torch, GQA native), with the
  true longest document as its grid bound and with the row length (a bound the host knows
  without reading the GPU).

    python bench/attention.py [--shape llama-1b] [--regime short] [--forms bwd,varlen]   # ~1-2 min on an H200

(Long samples compile each flex form for 16,384 tokens: with every form that took over 110 s
in round 9; --forms takes fewer.)

Prints one line per form (ms per forward+backward, TFLOP/s of the in-document work, max
difference from flex's default) and writes `$OUT/attention.json`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

import gpu_train  # noqa: E402  (the bench's shapes and synthetic samples)

# kernel_options to try: forward tiles (BLOCK_M, BLOCK_N), backward tiles (BLOCK_M1, BLOCK_N1,
# BLOCK_M2, BLOCK_N2), warps and stages. Tiles must divide the mask's 128-token blocks.
FLEX_OPTIONS: dict[str, dict[str, int]] = {
    "fwd 128x64 w4 s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    "fwd 64x64 w4 s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "fwd 128x128 w8 s3": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    "bwd 64/64 w4 s3": dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64, num_warps=4, num_stages=3),
    "bwd 32/64 w4 s3": dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=4, num_stages=3),
    "bwd 64/128 w8 s3": dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64, num_warps=8, num_stages=3),
    # fwd_/bwd_ prefixes: an option for one kernel only (the others above set both kernels' warps and stages)
    "bwd-only 32/64 w4 s3": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=32, bwd_num_warps=4,
                                 bwd_num_stages=3),
    "fwd 128x128 w8 s3 + bwd 64/128 w8 s3": dict(fwd_BLOCK_M=128, fwd_BLOCK_N=128, fwd_num_warps=8, fwd_num_stages=3,
                                                 bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=64,
                                                 bwd_num_warps=8, bwd_num_stages=3),
}


def packed_docs(regime: str, vocab: int, length: int, seed: int = 0) -> list[int]:
    """Document lengths of the first packed row of the bench's samples (filled in order, the
    rest of the row one padding document, as `fast.pad_packed` does)."""
    docs, used = [], 0
    for sample in gpu_train.synth_samples(400, regime, vocab, seed):
        if used + len(sample) > length:
            break
        docs.append(len(sample))
        used += len(sample)
    return docs + ([length - used] if used < length else [])


def in_document_flops(docs: list[int], heads: int, head_dim: int) -> float:
    """Forward + backward FLOPs of causal attention inside each document: per head 2 matmuls of
    L^2 / 2 * d multiply-adds forward (QK^T, PV), 2.5x that backward (5 matmuls)."""
    forward = sum(2 * 2 * n * n / 2 * head_dim for n in docs) * heads
    return forward * 3.5


def timed(fn: Any, iters: int = 20, warmup: int = 3) -> float:
    """Median ms of `fn()` (forward + backward), CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(gpu_train.SHAPES))
    parser.add_argument("--regime", default="short", choices=sorted(gpu_train.REGIMES))
    parser.add_argument("--forms", default="",
                        help="only the forms whose names contain one of these comma-separated words ('bwd 32,varlen')")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import flex_attention

    from tunesmith.model.fast import document_block_mask

    shape = gpu_train.SHAPES[args.shape]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape["hidden_size"] // heads
    length = gpu_train.REGIMES[args.regime][3]
    docs = packed_docs(args.regime, shape["vocab_size"], length)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(h: int) -> torch.Tensor:  # (L, H, D): the layout the projections produce
        return torch.randn(length, h, head_dim, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()

    q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
    grad_out = torch.randn(length, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    positions = torch.cat([torch.arange(n, device=device) for n in docs]).unsqueeze(0)
    mask = document_block_mask(positions)
    torch._dynamo.config.recompile_limit = 64  # one compiled flex per kernel_options
    flex = torch.compile(flex_attention, dynamic=False)
    flops = in_document_flops(docs, heads, head_dim)
    report: dict[str, Any] = {"shape": args.shape, "regime": args.regime, "length": length, "docs": len(docs),
                              "longest": max(docs), "in_document_tflop": flops / 1e12, "env": gpu_train.environment(),
                              "rows": {}}
    print(f"{args.shape} {args.regime}: {len(docs)} documents in {length} tokens (longest {max(docs)}); "
          f"{heads} heads, {kv_heads} kv heads, head dim {head_dim}; {flops / 1e12:.2f} TFLOP fwd+bwd in documents",
          flush=True)

    def flex_call(options: dict[str, int] | None) -> Any:
        def run() -> tuple[torch.Tensor, ...]:
            out = flex(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                       block_mask=mask, enable_gqa=True, kernel_options=options)
            out = out[0].transpose(0, 1)  # (L, H, D)
            return (out, *torch.autograd.grad(out, (q, k, v), grad_out))
        return run

    def varlen_call(bound: int) -> Any:
        from torch.nn.attention import varlen

        cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], device=device, dtype=torch.int32)
        causal = ({"is_causal": True} if "is_causal" in inspect.signature(varlen.varlen_attn).parameters
                  else {"window_size": (-1, 0)})

        def run() -> tuple[torch.Tensor, ...]:
            out = varlen.varlen_attn(q, k, v, cu, cu, bound, bound, **causal)
            return (out, *torch.autograd.grad(out, (q, k, v), grad_out))
        return run

    reference = None
    forms: list[tuple[str, Any]] = [("flex default", lambda: flex_call(None))]
    forms += [(f"flex {name}", (lambda o: lambda: flex_call(o))(opts)) for name, opts in FLEX_OPTIONS.items()]
    forms += [("varlen (FA2), bound = longest document", lambda: varlen_call(max(docs))),
              ("varlen (FA2), bound = row length", lambda: varlen_call(length))]
    wanted = [w.strip() for w in args.forms.split(",") if w.strip()]
    forms = [(name, make) for name, make in forms
             if name == "flex default" or not wanted or any(w in name for w in wanted)]
    for name, make in forms:  # (flex's default stays first: the reference of every diff)
        started = time.perf_counter()
        try:
            run = make()
            outs = run()
            ms = timed(run)
        except Exception as exc:  # a config the kernel refuses, or no varlen in this torch
            report["rows"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{name:44s} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        if reference is None:
            reference = [t.detach().float() for t in outs]
        diffs = [float((t.detach().float() - r).abs().max()) for t, r in zip(outs, reference)]
        row = report["rows"][name] = {"ms": ms, "tflops": flops / ms / 1e9, "max_abs_diff": diffs,
                                      "setup_s": time.perf_counter() - started}
        print(f"{name:44s} {ms:7.3f} ms  {row['tflops']:6.1f} TFLOP/s  max |diff| out/dq/dk/dv "
              + " ".join(f"{d:.3g}" for d in diffs) + f"  (setup {row['setup_s']:.0f} s)", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "attention.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
