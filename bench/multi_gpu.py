"""Multi-GPU benchmark: tokens/s per GPU, scaling efficiency, peak memory and loss curve, N vs 1 GPU.

    python bench/multi_gpu.py --gpus 2                      # CUDA: the three cases below, 1 and 2 GPUs
    python bench/multi_gpu.py --tiny --device cpu --gpus 2  # the same code on CPU with gloo, in a minute

Cases (random weights, synthetic packed samples, no network; the code `tunesmith train` runs:
the parameter set, the fast path, `train.distributed.wrap`, the ONE loop):
- llama-1b full, FSDP2 (`fully_shard` per decoder block, bf16 compute, fp32 master/reduce);
- llama-1b LoRA r=16 all-linear, DDP;
- llama-8b shape full, FSDP2, activation checkpointing (on 1 GPU it may not fit: reported).
Each case runs under `torchrun --nproc_per_node K` for K = 1 and K = N with the same global
batch (tokens per optimizer step), so the per-step losses should agree (1 GPU uses the
single-GPU optimizer policy, bf16 weights + stochastic rounding, so on CUDA they agree
closely, not exactly; on CPU everything is fp32 and they agree to ~1e-6).
Reported: real tokens/s of the whole run and per GPU (timed after warm-up steps), scaling
efficiency = per-GPU tokens/s on N / tokens/s on 1, peak memory of the busiest rank, the
largest per-step loss difference. NVLink multicast (NCCL NVLS) is kept off. JSON goes to
$OUT/multi_gpu.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (not supported on the lent machines)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000, tie_word_embeddings=True),
}
# case: (shape, method, --parallel, batch tokens, grad accum, steps, warm-up steps, activation checkpointing)
CASES: dict[str, tuple[str, str, str, int, int, int, int, bool]] = {
    "llama-1b full fsdp": ("llama-1b", "full", "fsdp", 8192, 2, 30, 5, False),
    "llama-1b lora ddp": ("llama-1b", "lora", "ddp", 8192, 2, 30, 5, False),
    "llama-8b full fsdp": ("llama-8b", "full", "fsdp", 8192, 2, 12, 4, True),
}


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak accelerator memory (CPU: peak resident memory)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(shape: str, method: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A random Llama of `shape` on `device` (the same on every rank: same seed), wrapped by the parameter set."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.config import MethodOptions
    from tunesmith.methods import PARAMETER_SETS

    config = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return PARAMETER_SETS[method].wrap(model, MethodOptions(method=method, lora_r=16, lora_alpha=32))


def worker(case: str, tiny: bool, device_name: str, out: Path) -> None:
    """One case in this torchrun process group (or alone): train, time, write rank 0's figures."""
    from gpu_train import synth_samples

    from tunesmith.config import LoopOptions
    from tunesmith.data.tokenize import TokenizedSample
    from tunesmith.methods import OBJECTIVES, PARAMETER_SETS
    from tunesmith.model.fast import prepare_for_training
    from tunesmith.train.checkpoint import TrainState
    from tunesmith.train.distributed import choose_wrapper, start, wrap
    from tunesmith.train.loop import DataPlan, Engine, train
    from tunesmith.train.optim import make_optimizer
    from tunesmith.train.progress import RunLog
    from tunesmith.train.schedule import cosine_schedule

    shape, method, parallel, batch_tokens, accum, steps, warmup, checkpointing = CASES[case]
    if tiny:
        shape, batch_tokens, steps, warmup = "tiny", 256, 8, 2
        torch.set_num_threads(1)
    dist = start(device_name)
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(shape, method, device, dtype)
    setup = prepare_for_training(model, device=device, batch_tokens=batch_tokens, fast_kernels=device.type == "cuda",
                                 gradient_checkpointing=checkpointing, cuda_graphs=not dist.enabled)
    wrapper = choose_wrapper(parallel, PARAMETER_SETS[method].adapter)
    loss_fn = wrap(dist, model, OBJECTIVES["sft"].make_loss(setup), wrapper, device, dtype)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad],
                               lr=2e-4 if method == "lora" else 2e-5, seed=0)
    samples = [TokenizedSample(s, s) for s in synth_samples(4000, "short", SHAPES[shape]["vocab_size"])]
    plan = DataPlan(samples, batch_tokens, seed=0, rank=dist.rank, world=dist.world)
    scheduler = cosine_schedule(optimizer, steps)
    opts = LoopOptions(batch_tokens=batch_tokens, grad_accum=accum, max_steps=steps)
    with tempfile.TemporaryDirectory() as tmp:
        log = RunLog(Path(tmp), steps, enabled=dist.is_main, show_bar=False)
        engine = Engine(model, optimizer, scheduler, loss_fn, device, dist)
        state = train(engine, plan, [], opts, TrainState(), warmup, log, lambda s: Path(tmp))
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        started, before = time.perf_counter(), state.tokens
        state = train(engine, plan, [], opts, state, steps, log, lambda s: Path(tmp))
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        seconds = time.perf_counter() - started
        log.close()
    peak = torch.tensor([peak_memory_gib(device)], device=device)
    if dist.enabled:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    if dist.is_main:
        tokens = state.tokens - before
        out.write_text(json.dumps({
            "case": case, "shape": shape, "processes": dist.world, "wrapper": wrapper if dist.enabled else "none",
            "tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds / dist.world,
            "peak_gib_max_rank": float(peak[0]), "timed_tokens": tokens, "seconds": seconds,
            "losses": [r["train_loss"] for r in log.history if "train_loss" in r], "notes": setup.notices}))
    dist.close()


def launch(case: str, processes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one case under torchrun with `processes` processes; its figures, or the error it ended with."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(Path(__file__).resolve()), "--worker", case, "--device", args.device, "--result", str(out)]
        if args.tiny:
            command.append("--tiny")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            lines = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
            return {"case": case, "processes": processes, "error": (lines or done.stderr.splitlines() or ["?"])[-1]}
        return json.loads(out.read_text())


def compare(one: dict[str, Any], many: dict[str, Any]) -> dict[str, Any]:
    """Scaling efficiency and the largest per-step loss difference, N vs 1."""
    if "error" in one or "error" in many:
        return {}
    diffs = [abs(a - b) / max(abs(a), 1e-9) for a, b in zip(one["losses"], many["losses"])]
    return {"scaling_efficiency": many["tokens_per_s_per_gpu"] / one["tokens_per_s"],
            "max_rel_loss_diff": max(diffs) if diffs else None}


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The printed summary."""
    lines = ["| case | GPUs | wrapper | tok/s | tok/s per GPU | scaling | peak GiB (max rank) | max loss diff |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        for run in (row["one"], row["many"]):
            if "error" in run:
                lines.append(f"| {run['case']} | {run['processes']} | | error: {run['error'][:80]} | | | | |")
                continue
            scaled = run is row["many"] and row["compare"]
            lines.append(f"| {run['case']} | {run['processes']} | {run['wrapper']} | {run['tokens_per_s']:,.0f} | "
                         f"{run['tokens_per_s_per_gpu']:,.0f} | "
                         f"{format(row['compare']['scaling_efficiency'], '.0%') if scaled else ''} | "
                         f"{run['peak_gib_max_rank']:.2f} | "
                         f"{format(row['compare']['max_rel_loss_diff'], '.2e') if scaled else ''} |")
    return lines


def main() -> None:
    """Driver: every case on 1 and on N processes; or, with --worker, one case inside torchrun."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="N: processes of the multi-GPU runs")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo, for checking the script")
    parser.add_argument("--tiny", action="store_true", help="a tiny model shape (the CPU check)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of: " + ", ".join(CASES))
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for multi_gpu.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.tiny, args.device, Path(args.result))
        return
    rows = []
    if args.tiny:
        print("(--tiny: every case at the tiny shape, to check the script; figures mean nothing)")
    for case in args.cases.split(","):
        one, many = launch(case, 1, args), launch(case, args.gpus, args)
        rows.append({"one": one, "many": many, "compare": compare(one, many)})
        print("\n".join(table(rows[-1:])[2:]), flush=True)
    print("\n".join(table(rows)))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "multi_gpu.json").write_text(json.dumps({"gpus": args.gpus, "device": args.device,
                                                               "tiny": args.tiny, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
