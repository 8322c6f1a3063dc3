"""Where a LoRA step's GPU time goes, kernel by kernel, beside full fine-tuning's, on a few layers.

Why: on the Llama-3.2-1B shape LoRA does about two thirds of full fine-tuning's matmul FLOPs,
yet runs only ~1.22x its tokens/s (bench/README.md, round 9). This builds the fast path's model
(`prepare_for_training`, the compiled layers and the fused loss) with a few decoder layers of
the shape, runs forward + backward (no optimizer) over the bench's packed rows in each form
below, and prints per form: ms per forward + backward, and the kernels' device time per step,
largest first, beside the first form's time for the same kernel. With --code, the inductor
code of every compiled graph is written to $OUT/code-<form>-*.py (the kernels' source, to read
what a fused kernel does).

- full: every weight trains;
- lora: the default (the grouped calls as the written-out node, `model/lora_graph.py`);
- lora plain math: the grouped calls as plain math (`lora_graph.WRITTEN_OUT` off);
- lora Function: one `LoraLinear` Function node per adapted linear (`lora_node.NODE`).
Round 9 (bench/README.md) timed two more forms of the written-out node with it, both slower
and since removed: one output per member (no concatenated gradient) and gh = g B taken from
grad x's matmul.

    python bench/lora_layer.py [--shape llama-1b] [--layers 4]   # ~2 min on an H200

Writes `$OUT/lora_layer.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

import gpu_train  # noqa: E402  (the bench's shapes, models and synthetic samples)

FORMS: dict[str, tuple[str, dict[str, Any]]] = {  # name: (method, `gpu_train.with_fast_settings` switches)
    "full": ("full", {}),
    "lora": ("lora", {}),
    "lora plain math": ("lora", {"written_out": False}),
    "lora Function": ("lora", {"lora_form": "function"}),
}


def inductor_code_since(started: float, dest: Path, prefix: str) -> int:
    """Copy the inductor output modules (the ones with a `call`) written since `started` to `dest`
    as `<prefix>-<name>.py`."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    copied = 0
    for path in Path(cache_dir()).rglob("*.py"):
        if path.stat().st_mtime >= started and "def call(" in path.read_text(errors="ignore"):
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest / f"{prefix}-{path.name}")
            copied += 1
    return copied


def run_form(name: str, method: str, shape: str, layers: int, out: Path | None) -> dict[str, Any]:
    """ms per forward + backward and kernel device time per step of one form (its switches set
    by the caller)."""
    from torch.profiler import ProfilerActivity, profile

    from tunesmith.config import MethodOptions
    from tunesmith.data.tokenize import TokenizedSample
    from tunesmith.methods import OBJECTIVES, PARAMETER_SETS
    from tunesmith.model.fast import prepare_for_training
    from tunesmith.train.loop import DataPlan

    started = time.time()
    config = gpu_train.model_config(shape)
    config.num_hidden_layers = layers
    if gpu_train.DEVICE == "cuda":
        gpu_train.free_gpu()
    model = gpu_train.build_model(config, torch.bfloat16)
    model = PARAMETER_SETS[method].wrap(model, MethodOptions(method=method, lora_r=16, lora_alpha=32))
    budget = gpu_train.REGIMES["short"][3]
    setup = prepare_for_training(model, device=torch.device(gpu_train.DEVICE), batch_tokens=budget)
    loss_fn = OBJECTIVES["sft"].make_loss(setup)
    samples = gpu_train.synth_samples(400, "short", config.vocab_size)
    plan = DataPlan([TokenizedSample(s, s) for s in samples], budget, seed=0)
    batches = [plan.collate(g).to(torch.device(gpu_train.DEVICE)) for g in plan.groups(0)[:4]]
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        result = loss_fn(model, batch)
        (result.total / max(1, batch.num_targets)).backward()
        for p in params:
            p.grad = None

    def sync() -> None:
        if gpu_train.DEVICE == "cuda":
            torch.cuda.synchronize()

    for i in range(6):  # compile (both layer variants) and warm up
        step(i)
    sync()
    compiled_s = time.time() - started
    times = []
    for i in range(12):
        begun = time.perf_counter()
        step(i)
        sync()
        times.append(1e3 * (time.perf_counter() - begun))
    steps = 4
    activity = ProfilerActivity.CUDA if gpu_train.DEVICE == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for i in range(steps):
            step(i)
        sync()
    kernels = {e.key: e.self_device_time_total / steps / 1e3 for e in prof.key_averages()
               if e.self_device_time_total > 0}  # (none on the CPU)
    code = inductor_code_since(started, out, "code-" + name.replace(" ", "-")) if out else 0
    return {"ms": sorted(times)[len(times) // 2], "kernels_ms": kernels, "compile_s": compiled_s,
            "code_files": code, "kernel_total_ms": sum(kernels.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(gpu_train.SHAPES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--forms", default=",".join(FORMS), help="comma-separated names of FORMS")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--code", action="store_true", help="also write each compiled graph's inductor code")
    parser.add_argument("--cpu", action="store_true",
                        help="a smoke run of the script itself: a tiny shape on the CPU (no compiled layers)")
    args = parser.parse_args()
    if args.cpu:  # a tiny Llama, so every form runs in seconds (the layers are not compiled on the CPU)
        gpu_train.DEVICE = "cpu"
        gpu_train.SHAPES["tiny"] = dict(family="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, vocab_size=512)
        gpu_train.REGIMES["short"] = (50, 8, 100, 512, 100)  # samples of 8..100 tokens, 512-token rows
        args.shape = "tiny"
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"shape": args.shape, "layers": args.layers, "forms": {},
                              "env": gpu_train.environment() if gpu_train.DEVICE == "cuda" else {}}
    for name in args.forms.split(","):
        method, switches = FORMS[name]
        try:
            row = report["forms"][name] = gpu_train.with_fast_settings(
                run_form, name, method, args.shape, args.layers, out if args.code else None, **switches)
        except Exception as exc:  # a form that fails is reported, the others still run
            report["forms"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        print(f"\n{name}: {row['ms']:.2f} ms per forward+backward ({args.layers} layers), kernels "
              f"{row['kernel_total_ms']:.2f} ms, compile+warm-up {row['compile_s']:.0f} s, "
              f"{row['code_files']} code files",
              flush=True)
        first = next(iter(report["forms"].values()))
        for key, ms in sorted(row["kernels_ms"].items(), key=lambda kv: -kv[1])[:28]:
            base = first.get("kernels_ms", {}).get(key, 0.0)
            print(f"  {ms:8.3f} ms  (first form {base:8.3f})  {key[:110]}", flush=True)
        (out / "lora_layer.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
