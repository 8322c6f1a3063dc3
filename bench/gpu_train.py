"""GPU training benchmark: tunesmith's training code vs the usual Hugging Face Trainer recipes.

One command, one run, on one CUDA GPU, no network (random weights, synthetic tokens):

    python bench/gpu_train.py            # Llama-3.2-1B shape, short samples: the table of issue 7
    python bench/gpu_train.py --sweep    # instead: 1B/3B/Qwen-0.5B shapes x full/LoRA x short/long samples
    python bench/gpu_train.py --dpo      # instead: DPO LoRA/full vs TRL's DPOTrainer (bench/dpo_rows.py)
    python bench/gpu_train.py --qlora    # instead: QLoRA, Llama-3.1-8B shape (bench/qlora.py; needs bitsandbytes)
    python bench/gpu_train.py --plan-check  # instead: measured peak vs `tunesmith plan`, 1B/3B/8B shapes
    python bench/gpu_train.py --host-profile  # instead: host vs GPU time of full / LoRA steps, each LoRA form
    python bench/gpu_train.py --default-budget  # instead: the plan's budget rows beside TRL SFT full
    python bench/gpu_train.py --plan-check-fast  # instead: the compiled path's measured peak vs the memory plan
    python bench/gpu_train.py --default-budget --card 24  # any mode: as on a 24 GiB card

Measures the GPU's bf16 matmul rate (8192^3), then on the same synthetic samples (Alpaca-like
lengths: log-normal, median ~200, clipped to 32..1024) runs: Trainer full (fp32 weights + bf16
autocast, dynamic padding, batch 8), Trainer + peft LoRA r=16 all-linear (bf16 base), and
tunesmith full / LoRA through its real loop (`tunesmith.train.loop.train`, the method and
fast-path setup of `tunesmith train`), and the peers users pick instead: TRL's SFTTrainer (bf16,
liger, packing; without gradient checkpointing, its faster form here, and with it, TRL's default,
on `--trl-defaults`) and Unsloth (bench/unsloth_rows.py: a child process, from the site folder
bench/unsloth_site.sh builds). Real (non-padding) tokens/s are timed after warm-up
steps; MFU counts 6*N (full) or 4*N (LoRA) FLOPs per token plus causal attention within each
document, over the measured matmul rate. Prints a compact table; writes JSON to $OUT (or --out).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(family="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256),
    "llama-3b": dict(family="llama", hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256),
    "qwen-0.5b": dict(family="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
}
# regime: (median length, min, max, tunesmith batch tokens, samples in the default run)
REGIMES = {"short": (200, 32, 1024, 8192, 1800), "long": (2000, 256, 8192, 16384, 200)}
# --sweep: the shapes and regimes besides the headline (1B short) that must keep their lead.
SWEEP = [("llama-1b", "long"), ("llama-3b", "long"), ("qwen-0.5b", "short"), ("llama-3b", "short")]  # peers last: see README
WARMUP_STEPS = 4
REPEATS = 3  # the headline's tunesmith rows run this often; the table shows min / median / max
STARTER = Path(__file__).resolve().parent.parent / "src" / "tunesmith" / "assets" / "starter"
DEVICE = "cuda"  # the CPU smoke check in bench/README.md sets "cpu"


@dataclass
class Result:
    """One training run's figures."""

    name: str
    tokens_per_s: float = 0.0
    peak_gib: float = 0.0
    mfu: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    repeats: list[float] = field(default_factory=list)  # tokens/s of every repeat (the row is the median one)
    reserved_gib: float = 0.0  # peak memory the allocator held (CUDA graph pools included), not only allocated


def matmul_tflops() -> float:
    """Median bf16 rate of an 8192^3 matmul in TFLOP/s (random data, 20 timed after 5 warm-up)."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def model_config(shape: str) -> Any:
    """A transformers config of the named shape (tied embeddings, as the real models)."""
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    return AutoConfig.for_model(family, tie_word_embeddings=True, max_position_embeddings=8192,
                                rope_theta=500000.0, **spec)


def build_model(config: Any, dtype: torch.dtype) -> Any:
    """A random model of `config`, created directly on the GPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def synth_samples(n: int, regime: str, vocab: int, seed: int = 0) -> list[list[int]]:
    """`n` token sequences with log-normal lengths; each repeats a random motif, so loss can fall."""
    median, lo, hi = REGIMES[regime][:3]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(min(hi, max(lo, rng.lognormvariate(math.log(median), 0.75))))
        motif = [rng.randrange(1, min(vocab, 32000)) for _ in range(rng.randint(8, 32))]
        out.append((motif * (length // len(motif) + 1))[:length])
    return out


def step_flops(config: Any, n_params: int, doc_lengths: list[int], lora: bool) -> float:
    """Model FLOPs: (6 or 4) * N * tokens + causal attention within each document (fwd + bwd)."""
    tokens = sum(doc_lengths)
    heads_dim = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    attention = 6 * config.num_hidden_layers * heads_dim * sum(n * n for n in doc_lengths)
    return (4 if lora else 6) * n_params * tokens + attention


def step_clock(marks: dict[int, float]) -> Any:
    """A Trainer callback that records the wall time at the end of each optimizer step (GPU synced)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            torch.cuda.synchronize()
            marks[state.global_step] = time.perf_counter()

    return Clock()


def timed_train(engine: Any, plan: Any, steps: int, batch_tokens: int) -> tuple[Any, list[dict[str, Any]], int, float]:
    """Run the real loop for `steps` steps; time those after WARMUP_STEPS (GPU synced at both ends).

    Returns the final state, the logged records, the real tokens of the timed steps and their seconds.
    """
    from tunesmith.config import LoopOptions
    from tunesmith.train.checkpoint import TrainState
    from tunesmith.train.loop import train
    from tunesmith.train.progress import RunLog

    opts = LoopOptions(batch_tokens=batch_tokens, max_steps=steps)
    with tempfile.TemporaryDirectory() as tmp:
        log = RunLog(Path(tmp), steps, show_bar=False)
        started = time.perf_counter()
        state = train(engine, plan, [], opts, TrainState(), WARMUP_STEPS, log, lambda s: Path(tmp))
        torch.cuda.synchronize()
        # printed at once: a call cut at its time limit then says how far its last row got
        print(f"  warm-up, {WARMUP_STEPS} steps (compiling, recording CUDA graphs): "
              f"{time.perf_counter() - started:.1f} s; {compile_phases()}", flush=True)
        started, tokens_before = time.perf_counter(), state.tokens
        state = train(engine, plan, [], opts, state, steps, log, lambda s: Path(tmp))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        log.close()
    return state, log.history, state.tokens - tokens_before, seconds


def emulate_card(gib: float) -> None:
    """Make this process see a GPU of `gib` GiB, CUDA context included: the caching allocator is
    capped (`set_per_process_memory_fraction`: an allocation past the cap is an OOM, as on the
    smaller card) and `torch.cuda.mem_get_info`, what the memory plan sizes against, answers for it."""
    from tunesmith.train.plan import CUDA_CONTEXT

    cap = gib * 2**30 - CUDA_CONTEXT
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)

    def mem_get_info(device: Any = None) -> tuple[int, int]:
        return max(0, int(cap - torch.cuda.memory_reserved(device))), int(gib * 2**30)

    torch.cuda.mem_get_info = mem_get_info


def compile_phases(top: int = 10) -> str:
    """The compile phases that took longest in this process so far (torch's own counters, seconds
    summed over every graph): says whether a slow warm-up is tracing, partitioning, code
    generation or waiting on Triton's kernel compiles."""
    from torch._dynamo.utils import compile_times

    names, seconds = compile_times(repr="csv", aggregate=True)
    ranked = sorted(zip(names, map(float, seconds)), key=lambda kv: -kv[1])
    return "compile phases: " + ", ".join(f"{name} {sec:.1f}" for name, sec in ranked[:top])


def free_gpu() -> None:
    """Release everything the previous run left, and restart peak-memory accounting."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------
# Baselines: the Hugging Face Trainer as usually configured.


def run_trainer(config: Any, samples: list[list[int]], lora: bool, rate: float, make_model: Any = None,
                label: str | None = None, n_params: int | None = None) -> Result:
    """Trainer: fp32 weights + bf16 autocast (full) or peft LoRA r=16 on a bf16 base; batch 8, dynamic padding.

    `make_model()` replaces the model with one already wrapped (the QLoRA rows of bench/qlora.py).
    """
    from transformers import Trainer, TrainingArguments

    name = label or ("Trainer+peft LoRA" if lora else "Trainer full")
    free_gpu()
    model = make_model() if make_model else build_model(config, torch.bfloat16 if lora else torch.float32)
    n_params = n_params or sum(p.numel() for p in model.parameters())
    if lora and make_model is None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    counts: list[int] = []
    lengths: list[list[int]] = []

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, :len(r["input_ids"])] = 1
        counts.append(int(mask.sum()))
        lengths.append([len(r["input_ids"]) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    marks: dict[int, float] = {}

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=8, bf16=DEVICE == "cuda", num_train_epochs=1,
                                 learning_rate=2e-4 if lora else 1e-5, logging_steps=10**6, save_strategy="no",
                                 report_to="none", dataloader_num_workers=0, remove_unused_columns=False,
                                 disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": s} for s in samples],
                          data_collator=collate, callbacks=[step_clock(marks)])
        trainer.train()
    steps = max(marks)
    tokens = sum(counts[WARMUP_STEPS:steps])
    seconds = marks[steps] - marks[WARMUP_STEPS]
    flops = sum(step_flops(config, n_params, d, lora) for d in lengths[WARMUP_STEPS:steps])
    result = Result(name, tokens / seconds, torch.cuda.max_memory_allocated() / 2**30, flops / seconds / rate / 1e12,
                    steps, tokens, seconds)
    del trainer, model
    return result


def run_trl(config: Any, samples: list[list[int]], lora: bool, rate: float, max_length: int,
            checkpointing: bool = True, make_model: Any = None, label: str | None = None,
            n_params: int | None = None) -> Result:
    """TRL's SFTTrainer as its docs recommend for speed: bf16 weights, liger kernels, BFD packing
    (padding-free, position ids restart per sample) into rows of `max_length` tokens, batch 1 row.

    `checkpointing`: SFTConfig's `gradient_checkpointing`, which TRL turns on by default (to save
    memory); False is the faster form wherever the model fits, so the best peer is the faster
    of the two. `make_model()` gives a model already prepared by another library, LoRA included
    (Unsloth's, bench/unsloth_rows.py): it brings its own kernels, so liger stays off.
    `n_params`: the unquantised parameter count, for a 4-bit model (whose tensors report packed sizes).
    """
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    name = label or ("TRL SFT LoRA" if lora else "TRL SFT full") + ("" if checkpointing else " (no checkpointing)")
    free_gpu()
    model = make_model() if make_model else build_model(config, torch.bfloat16)
    n_params = n_params or sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)  # the base's
    peft_config = None
    if lora and make_model is None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(STARTER)  # only its pad id is used: the samples are token ids
    marks: dict[int, float] = {}
    counts: list[tuple[int, int]] = []  # (optimizer steps done, tokens) of each micro-batch

    from datasets import Dataset

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, per_device_train_batch_size=1, bf16=True, num_train_epochs=1,
                         learning_rate=2e-4 if lora else 1e-5, logging_steps=10**6, save_strategy="no",
                         report_to="none", dataloader_num_workers=0, disable_tqdm=True, seed=0,
                         packing=True, max_length=max_length, use_liger_kernel=make_model is None,
                         gradient_checkpointing=checkpointing, gradient_accumulation_steps=1)  # (Unsloth's is 2)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": samples}),
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[step_clock(marks)])
        step = trainer.training_step

        def counted(model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
            # padding-free rows: every id is a real token
            counts.append((len(marks), int(inputs["input_ids"].numel())))
            return step(model, inputs, *a, **k)

        trainer.training_step = counted  # type: ignore[method-assign]
        trainer.train()
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # (accelerate wraps it)
    steps = max(marks)
    tokens = sum(n for done, n in counts if WARMUP_STEPS <= done < steps)  # the micro-batches of the timed steps
    seconds = marks[steps] - marks[WARMUP_STEPS]
    flops = tokens * (4 if lora else 6) * n_params  # + attention, estimated from the mean document length
    mean_len = sum(map(len, samples)) / len(samples)
    flops += step_flops(config, 0, [int(mean_len)] * int(tokens / mean_len), lora)
    kind = type(optimizer)
    notes = [f"optimizer {kind.__module__}.{kind.__name__}, gradient checkpointing {checkpointing}"]
    result = Result(name, tokens / seconds, torch.cuda.max_memory_allocated() / 2**30, flops / seconds / rate / 1e12,
                    steps, tokens, seconds, notes=notes)
    del trainer, model, optimizer
    return result


# ------------------------------------------------------------------------------------------------
# tunesmith: the same code `tunesmith train` runs (method, fast path, optimizer policy, loop).


def run_tunesmith(config: Any, samples: list[list[int]], method: str, fast: bool, batch_tokens: int | None, rate: float,
                  max_steps: int | None = None, profile: bool | str = False, label: str = "",
                  checkpointing: bool = False) -> Result:
    """Train through `tunesmith.train.loop.train`; time real tokens after the warm-up steps."""
    from tunesmith.config import MethodOptions
    from tunesmith.data.tokenize import TokenizedSample
    from tunesmith.methods import OBJECTIVES, PARAMETER_SETS
    from tunesmith.model import graphs
    from tunesmith.model.fast import causal_lm, prepare_for_training
    from tunesmith.train.loop import DataPlan, Engine, total_steps
    from tunesmith.train.losses import packing_is_exact
    from tunesmith.train.optim import make_optimizer
    from tunesmith.train.schedule import cosine_schedule

    name = f"tunesmith {method}" + ("" if fast else " (plain path)") + label
    free_gpu()
    model = build_model(config, torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model = PARAMETER_SETS[method].wrap(model, MethodOptions(method=method, lora_r=16, lora_alpha=32))
    setup = prepare_for_training(model, device=torch.device(DEVICE), batch_tokens=batch_tokens, fast_kernels=fast,
                                 gradient_checkpointing=checkpointing, longest_sample=max(map(len, samples)),
                                 accumulates=False)  # as `tunesmith train` passes them
    batch_tokens = setup.batch_tokens  # None above: the memory plan's choice, as `tunesmith train` makes it
    loss_fn = OBJECTIVES["sft"].make_loss(setup)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad],
                               lr=2e-4 if method == "lora" else 1e-4, weight_decay=0.0, seed=0)
    padded = setup.loss_sum is None and not packing_is_exact(model, torch.device(DEVICE))  # as `tunesmith train`
    plan = DataPlan([TokenizedSample(s, s) for s in samples], batch_tokens, seed=0, padded=padded)
    steps = total_steps(plan, 1, 1.0, max_steps)
    scheduler = cosine_schedule(optimizer, steps)
    engine = Engine(model, optimizer, scheduler, loss_fn, torch.device(DEVICE))
    state, history, tokens, seconds = timed_train(engine, plan, steps, batch_tokens)
    groups = [g for epoch in range(1 + steps // max(1, len(plan.groups(0)))) for g in plan.groups(epoch)]
    docs = [[len(plan.samples[i].input_ids) for i in group] for group in groups[WARMUP_STEPS:steps]]
    flops = sum(step_flops(config, n_params, d, method == "lora") for d in docs)
    result = Result(name, tokens / seconds, torch.cuda.max_memory_allocated() / 2**30,
                    flops / seconds / rate / 1e12, steps, tokens, seconds,
                    [r["train_loss"] for r in history if "train_loss" in r],
                    setup.notices + [f"attention={setup.attention} liger={setup.liger} batch_tokens={batch_tokens} "
                                     f"checkpointing={setup.checkpointing} optimizer={type(optimizer).__name__}"])
    recorded = graphs.attached(causal_lm(model))
    if recorded is not None:
        result.notes.append(f"CUDA graphs: {len(recorded.recordings)} row length(s) recorded"
                            + (f"; off: {recorded.off}" if recorded.off else ""))
    if DEVICE == "cuda":
        result.notes.append(memory_by_pool())
    if profile:
        result.notes.append(profile_steps(model, optimizer, plan, loss_fn, host=profile == "host"))
    del model, optimizer, scheduler, setup, loss_fn, engine
    return result


def memory_by_pool() -> str:
    """Reserved and allocated GiB now, per allocator pool: the default one and CUDA graphs' private
    pools (where the reserved peak above the allocated one sits)."""
    pools: dict[str, list[int]] = {}
    for segment in torch.cuda.memory_snapshot():
        pool = "default pool" if tuple(segment.get("segment_pool_id") or (0, 0)) == (0, 0) else "graph pools"
        sizes = pools.setdefault(pool, [0, 0])
        sizes[0] += segment["total_size"]
        sizes[1] += segment["allocated_size"]
    return "memory after the run: " + "; ".join(f"{pool} reserved {r / 2**30:.1f} GiB, allocated {a / 2**30:.1f}"
                                                for pool, (r, a) in pools.items())


def profile_steps(model: Any, optimizer: Any, plan: Any, loss_fn: Any, steps: int = 3, host: bool = False) -> str:
    """Where a fast step's time goes: GPU busy share and top kernels of a few profiled steps
    (issued as the loop issues them: no host reads inside), and host vs GPU time per step.

    `host`: also where the host's time goes: each phase's issue time (unprofiled, no sync
    added), the calls that make the host wait for the GPU (`aten::item` and other device-to-host
    reads, stream/device syncs) with their count and host time, and the top host-side ops.
    """
    from torch.profiler import ProfilerActivity, profile

    from tunesmith.train.loop import accumulate

    device = torch.device(DEVICE)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    phases: dict[str, float] = {}

    def timed(phase: str, fn: Any) -> Any:
        started = time.perf_counter()
        out = fn()
        phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - started
        return out

    def issue(batches: list[Any]) -> list[torch.Tensor]:
        losses = []
        for b in batches:
            if host:  # accumulate's steps one by one, so each phase's issue time shows
                b = timed("copy to GPU", lambda: b.to(device))
                result = timed("forward + loss", lambda: loss_fn(model, b))
                timed("backward", lambda: (result.total / max(1, b.num_targets)).backward())
                losses.append(result.total.detach())
            else:
                losses.append(accumulate(model, [b], loss_fn, device)[0])
            timed("clip", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True))
            timed("optimizer", optimizer.step)
            optimizer.zero_grad(set_to_none=True)
        return losses

    batches = [plan.collate(group) for group in plan.groups(1)[:2 * steps]]
    torch.cuda.synchronize()
    started = time.perf_counter()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host else [])
    with profile(activities=activities) as prof:
        issue(batches[:steps])
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - started) * 1e6
    phases.clear()
    started = time.perf_counter()  # unprofiled: how long the host takes to issue a step vs the GPU to run it
    issue(batches[steps:])
    issued = time.perf_counter() - started
    torch.cuda.synchronize()
    done = time.perf_counter() - started
    averages = prof.key_averages()
    events = [e for e in averages if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:12]
    note = (f"profile: GPU busy {100 * total / wall_us:.0f}% of {wall_us / 1e3 / steps:.0f} ms/step (profiled); "
            f"unprofiled: host issues a step in {1e3 * issued / steps:.0f} ms, GPU done after {1e3 * done / steps:.0f} ms/step; "
            "top kernels: " + "; ".join(f"{e.key[:60]} {100 * e.self_device_time_total / total:.1f}%" for e in top))
    if host:
        waits = [e for e in averages if any(k in e.key for k in ("item", "_local_scalar_dense", "Synchronize",
                                                                    "cudaMemcpy", "is_nonzero", "nonzero"))]
        cpu_top = sorted((e for e in averages if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)[:15]
        note += ("\nhost phases (issue ms/step, unprofiled): "
                 + ", ".join(f"{k} {1e3 * v / steps:.1f}" for k, v in phases.items())
                 + "\nhost waits (calls/step, host ms/step): "
                 + "; ".join(f"{e.key} {e.count / steps:.1f}x {e.cpu_time_total / 1e3 / steps:.1f}" for e in waits)
                 + "\ntop host ops (self ms/step): "
                 + "; ".join(f"{e.key[:50]} {e.count // steps}x {e.self_cpu_time_total / 1e3 / steps:.1f}"
                             for e in cpu_top))
    return note


# ------------------------------------------------------------------------------------------------
# Checks: the optimizer policy against fp32 master weights, the fused AdamW kernel against torch.


def check_optimizer_policy(steps: int = 200) -> dict[str, float]:
    """Loss curves over `steps` steps: bf16 + stochastic rounding vs fp32 master weights (4-layer 1B shape)."""
    from tunesmith.data.packing import pack
    from tunesmith.data.tokenize import TokenizedSample
    from tunesmith.model.fast import prepare_for_training
    from tunesmith.train.optim import make_optimizer

    config = model_config("llama-1b")
    config.num_hidden_layers = 4
    batches = pack([TokenizedSample(s, s) for s in synth_samples(1200, "short", config.vocab_size, seed=1)], 8192)
    curves = {}
    for policy in ("fp32-master", "bf16-sr"):
        free_gpu()
        model = build_model(config, torch.bfloat16)
        loss_fn = prepare_for_training(model, device=torch.device(DEVICE), batch_tokens=8192).loss_sum
        params = [p for p in model.parameters() if p.requires_grad]
        master = [p.detach().float().requires_grad_() for p in params] if policy == "fp32-master" else None
        opt = torch.optim.AdamW(master, lr=1e-4, fused=True) if master else make_optimizer(params, lr=1e-4)
        losses = []
        for step in range(steps):
            b = batches[step % len(batches)].to(torch.device(DEVICE))
            loss_sum, count, _ = loss_fn(model, b)
            (loss_sum / count).backward()
            losses.append(float(loss_sum) / count)
            del loss_sum  # as the loop does: no autograd graph outlives its step (model/graphs.py, `record`)
            if master:
                for p, m in zip(params, master):
                    m.grad = p.grad.float()
                    p.grad = None
            opt.step()
            opt.zero_grad(set_to_none=True)
            if master:
                with torch.no_grad():
                    torch._foreach_copy_(params, master)
        curves[policy] = losses
        del model, opt, master, params
    a, b = curves["fp32-master"], curves["bf16-sr"]
    return {"steps": steps, "first_loss": a[0], "last_loss_fp32_master": sum(a[-20:]) / 20,
            "last_loss_bf16_sr": sum(b[-20:]) / 20,
            "mean_rel_diff": sum(abs(x - y) / x for x, y in zip(a, b)) / steps,
            "max_rel_diff_20step_mean": max(abs(sum(a[i:i + 20]) - sum(b[i:i + 20])) / sum(a[i:i + 20])
                                            for i in range(0, steps - 19, 20))}


def check_fused_adamw(shape: str = "llama-1b", steps: int = 20) -> dict[str, float]:
    """The fused AdamW step against the torch ops, and its time on one shape's parameters.

    max_ulp: max |fused - torch| / bf16 ulp of max(|old weight|, |new weight|) over tensors of
    assorted sizes (1.0 = stochastic rounding either way), through `AdamWBF16.step(grad_scale=...)`
    as the loop calls it.
    ms, tb_per_s: one step over `shape`'s parameter sizes (22 bytes/param moved), beside
    the rate of a plain copy of the same bytes (what the memory allows).
    """
    from tunesmith.train.optim import AdamWBF16, _adamw_bf16_torch

    torch.manual_seed(0)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    sizes = (1, 4095, 4097, 1 << 20, 3 << 19)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda").to(torch.bfloat16)) for n in sizes]
    opt = AdamWBF16(params, lr=kw["lr"], weight_decay=kw["weight_decay"])
    refs = [(p.detach().clone(), torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32))
            for p in params]
    scale = torch.tensor(0.37, device="cuda")
    worst = 0.0
    for step in (1, 2, 3):
        before = [rp.float() for rp, _, _ in refs]
        for p, (rp, rm, rv) in zip(params, refs):
            p.grad = torch.randn_like(p)
            p.data.copy_(rp)  # each step from the reference's weights: the ulp bound is per step
            _adamw_bf16_torch(rp, p.grad, rm, rv, generator=None, grad_scale=scale, step=step, **kw)
        opt.step(grad_scale=scale)
        # the ulp of the larger of old and new weight: where the update cancels the weight, the
        # result is tiny and fp32 rounding (Triton's sqrt and division are not torch's) is not
        worst = max(worst, *(float(((p.detach().float() - rp.float()).abs()
                                    / (torch.maximum(rp.float().abs(), b.abs()) * 2**-7 + 1e-30)).max())
                             for p, (rp, _, _), b in zip(params, refs, before)))
    del params, refs, opt
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # sizes only: nothing allocated
        sizes = [p.numel() for p in AutoModelForCausalLM.from_config(model_config(shape)).parameters()]
    params = [torch.nn.Parameter(torch.zeros(n, device="cuda", dtype=torch.bfloat16)) for n in sizes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    from tunesmith.train import _optim_triton as kernel

    default = (kernel.BLOCK, kernel._WARPS)
    variants: dict[str, float] = {}
    try:  # the shipped (BLOCK, warps) and its neighbours, on the same tensors
        for block, warps in dict.fromkeys([default, (8192, 4), (4096, 4), (8192, 8), (16384, 8)]):
            kernel.BLOCK, kernel._WARPS = block, warps
            opt = AdamWBF16(params, lr=1e-5)  # a new block table for this BLOCK
            opt.step(grad_scale=scale)  # compile, allocate the moments
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                opt.step(grad_scale=scale)
            torch.cuda.synchronize()
            variants[f"{block}x{warps}"] = (time.perf_counter() - start) / steps * 1e3
            del opt
    finally:
        kernel.BLOCK, kernel._WARPS = default
    ms = variants[f"{default[0]}x{default[1]}"]
    n = sum(sizes)
    buf = torch.empty(11 * n, dtype=torch.bfloat16, device="cuda")  # 22 bytes/param, read once and written once
    half = buf.numel() // 2
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        buf[half:2 * half].copy_(buf[:half])
    torch.cuda.synchronize()
    copy_tb = 22 * n / ((time.perf_counter() - start) / steps) / 1e12
    del params, buf
    free_gpu()
    return {"max_ulp": worst, "ms": ms, "params": n, "tb_per_s": 22 * n / (ms * 1e-3) / 1e12, "copy_tb_per_s": copy_tb,
            "ms_by_block_x_warps": variants}


# ------------------------------------------------------------------------------------------------
# The runs and the table.


def fused_adamw_report() -> dict[str, Any]:
    """`check_fused_adamw`, printed; a failure is reported, not the end of the bench."""
    try:
        r: dict[str, Any] = check_fused_adamw()
    except Exception as e:  # noqa: BLE001 - the rows after it still run
        r = {"error": repr(e)}
    print(fused_adamw_line(r), flush=True)
    return r


def fused_adamw_line(r: dict[str, Any]) -> str:
    """The fused AdamW check as one printed line."""
    if "error" in r:
        return f"fused AdamW check failed: {r['error']}"
    return (f"fused AdamW vs torch: max diff {r['max_ulp']:.2f} bf16 ulp; one step over {r['params'] / 1e9:.2f}B "
            f"params {r['ms']:.2f} ms = {r['tb_per_s']:.2f} TB/s (a copy of the same bytes: {r['copy_tb_per_s']:.2f} TB/s); "
            "ms by BLOCK x warps: " + ", ".join(f"{k} {v:.2f}" for k, v in r.get("ms_by_block_x_warps", {}).items()))


def guarded(name: str, fn: Any, *args: Any, **kwargs: Any) -> Result:
    """Run one benchmark; an OOM or a failure becomes a row with the error instead of ending the bench."""
    print(f"[{name}] starting", flush=True)
    try:
        row = fn(*args, **kwargs)
        if torch.cuda.is_available():  # the peak since the run's free_gpu
            row.reserved_gib = torch.cuda.max_memory_reserved() / 2**30
        return row
    except Exception as exc:  # report every failure in the table, keep going
        free_gpu()
        kind = "OOM" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {str(exc)[:160]}"
        return Result(name, error=kind)


def with_fast_settings(fn: Any, *args: Any, compile_layers: bool = True, document_mask: bool = True,
                       lora_form: str | None = None, group_linears: bool = False, written_out: bool | None = None,
                       compile_checkpointed: bool | None = None, late_read: bool = False, separate_clip: bool = False,
                       cuda_graphs: bool | None = None, activation_memory_budget: float | None = None,
                       **kwargs: Any) -> Result:
    """`fn` with the fast path's switches set: layer compilation (off: eager liger layers), who
    builds the flex block mask (off: transformers), the LoRA node's form (`lora_node.NODES`),
    whether full fine-tuning's linears that share an input are grouped (`lora_graph.LINEARS`),
    whether grouped LoRA calls run as the written-out node (`lora_graph.WRITTEN_OUT`), and
    whether checkpointed layers are compiled too (`fast.COMPILE_CHECKPOINTED`), whether the
    decoder replays CUDA graphs (`fast.CUDA_GRAPHS`), what the compiled layers may save
    (`fast.ACTIVATION_MEMORY_BUDGET`: compile caches are dropped around such a row, so that its
    layers are partitioned anew); None keeps the library's setting.
    `late_read`: the loop reads each step's loss as before round 6, a `.tolist()` of the GPU
    tensor, which waits for everything queued by then (the next step too).
    `separate_clip`: torch's clipping scales the gradients in a pass of its own before the
    step, as before round 7, instead of inside AdamWBF16's update."""
    from tunesmith.model import fast, lora_graph, lora_node
    from tunesmith.train import loop, optim

    def start_late(step: int, loss: Any, norm: Any, metrics: dict[str, Any], *rest: Any) -> Any:
        values = torch.stack([loss.to(norm.device).float(), norm.float(), *(v.float() for v in metrics.values())])
        return loop.StepResult(step, values, list(metrics), None, *rest)  # no event: read = .tolist() on the GPU

    switches = [(fast, "COMPILE_LAYERS", compile_layers), (fast, "DOCUMENT_MASK", document_mask),
                (lora_node, "NODE", lora_form), (lora_graph, "LINEARS", group_linears),
                (lora_graph, "WRITTEN_OUT", written_out), (fast, "COMPILE_CHECKPOINTED", compile_checkpointed),
                (fast, "CUDA_GRAPHS", cuda_graphs), (fast, "ACTIVATION_MEMORY_BUDGET", activation_memory_budget),
                (loop.StepResult, "start", start_late if late_read else None),
                (optim.AdamWBF16, "fuses_grad_scale", False if separate_clip else None)]
    saved = [(owner, name, vars(owner)[name]) for owner, name, _ in switches]  # vars: the classmethod itself
    for owner, name, value in switches:
        if value is not None:  # None: the library's default
            setattr(owner, name, value)
    repartition = activation_memory_budget is not None
    if repartition:
        import torch._dynamo

        torch._dynamo.reset()  # layers of the rows before share the code object and its cached graphs
    try:
        return fn(*args, **kwargs)
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        if repartition:
            torch._dynamo.reset()


def repeated(specs: dict[str, tuple[str, Any, tuple[Any, ...], dict[str, Any]]], times: int) -> dict[str, Result]:
    """Each spec (name, fn, args, kwargs) run `times` times, taking turns (a, b, a, b, ...), so a
    drift of the machine during the run reaches every row alike; per key, the median run's row
    with every run's tokens/s in `repeats`. A profile (the first run's notes) is taken once."""
    runs: dict[str, list[Result]] = {key: [] for key in specs}
    for turn in range(times):
        for key, (name, fn, args, kwargs) in specs.items():
            later = {"profile": False} if turn and "profile" in kwargs else {}
            runs[key].append(guarded(name, fn, *args, **{**kwargs, **later}))
    rows = {}
    for key, results in runs.items():
        ok = sorted((r for r in results if not r.error), key=lambda r: r.tokens_per_s)
        rows[key] = ok[len(ok) // 2] if ok else results[0]
        if ok:
            rows[key].notes, rows[key].repeats = results[0].notes, [r.tokens_per_s for r in results if not r.error]
    return rows


def loss_parity(a: list[float], b: list[float], steps: int = 50) -> dict[str, float]:
    """Relative differences of two per-step loss curves over their first `steps` steps."""
    n = min(steps, len(a), len(b))
    a, b = a[:n], b[:n]
    return {"steps": n, "plain_first": a[0], "plain_last": a[-1], "fast_last": b[-1],
            "max_rel_diff": max(abs(x - y) / x for x, y in zip(a, b)),
            "mean_rel_diff": sum(abs(x - y) / x for x, y in zip(a, b)) / n}


def pair_parities(rows: dict[str, Result], pairs: list[tuple[str, str, str, str]]) -> dict[str, dict[str, float]]:
    """`loss_parity` of each (key, first row, second row, what) whose two rows ran without error,
    printed with the second's speed over the first's; by key."""
    out = {}
    for key, first, second, what in pairs:
        a, b = rows.get(first), rows.get(second)
        if a and b and not (a.error or b.error):
            out[key] = parity = loss_parity(a.losses, b.losses)
            print(f"loss parity {what}: max rel diff {100 * parity['max_rel_diff']:.3f}% over {parity['steps']} "
                  f"steps; speed x{b.tokens_per_s / a.tokens_per_s:.3f}", flush=True)
    return out


class SavedRows(dict):  # type: ignore[type-arg]
    """A comparison's rows: each one is printed and the partial table saved as it lands.

    `only`: comma-separated row keys to run (`--rows`); empty: all of them (`wants`, `run`).
    """

    def __init__(self, head: dict[str, Any], save: Any, tag: str | None = None, notes: bool = False,
                 only: str = "") -> None:
        super().__init__()
        self.head, self.save, self.tag, self.notes = head, save, tag, notes
        self.only = set(filter(None, only.split(",")))

    def wants(self, key: str) -> bool:
        """Whether the row `key` is to run."""
        return not self.only or key in self.only

    def run(self, key: str, name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """The row `key`: `fn(*args, **kwargs)` as `guarded` runs it, where it is wanted."""
        if self.wants(key):
            self[key] = guarded(name, fn, *args, **kwargs)

    def __setitem__(self, key: str, row: Result) -> None:
        super().__setitem__(key, row)
        print(f"[{self.tag or key}] {row.name}: {row.tokens_per_s:,.0f} tok/s, MFU {100 * row.mfu:.1f}%, peak "
              f"{row.peak_gib:.2f} GiB (reserved {row.reserved_gib:.2f})" + (f", {row.error}" if row.error else "")
              + ("".join(f"\n  {n}" for n in row.notes) if self.notes else ""), flush=True)
        if self.save:
            self.save(self.table())

    def table(self) -> dict[str, Any]:
        """The head and every row so far, as the JSON holds them."""
        return {**self.head, "runs": {k: asdict(v) for k, v in self.items()}}


def plan_check_row(shape: str, config: Any, method: str, tokens: int, setting: Any, r: Result) -> dict[str, Any]:
    """A measured run `r` beside the memory plan's estimate for it (`setting` at `tokens`), printed.

    The estimate is taken without the CUDA context: the allocator's peak does not count it."""
    from tunesmith.train import plan

    e = plan.estimate(plan.shape_from_config(config.to_dict(), shape), setting, tokens)
    est = (e.total - e.parts.get("cuda context", 0)) / 2**30
    row = {"shape": shape, "method": method, "tokens": tokens, "estimated_gib": est,
           "parts_gib": {k: v / 2**30 for k, v in e.parts.items()}, "measured_gib": r.peak_gib,
           "reserved_gib": r.reserved_gib, "error": r.error, "tokens_per_s": r.tokens_per_s,
           "rel_error": (est - r.peak_gib) / r.peak_gib if r.peak_gib else None, "notes": r.notes}
    print(f"plan check {shape:9} {method:5} {tokens:>6} tokens: estimated {est:6.2f} GiB, measured "
          f"{r.peak_gib:6.2f} (reserved {r.reserved_gib:6.2f})"
          + (f", error {100 * row['rel_error']:+.1f}%" if row["rel_error"] is not None else f" ({r.error})"),
          flush=True)
    return row


def fast_plan_check(rate: float, save: Any = None) -> dict[str, Any]:
    """The compiled fast path's measured peak vs the memory plan's estimate, each shape and method
    at two or three token budgets (short samples packed to the budget, no checkpointing, CUDA graphs
    as `tunesmith train` uses them): the slope between budgets is the per-token figure that the
    plan's `layer_bytes_per_token` must match; the rest is the static part."""
    from tunesmith.model import fast
    from tunesmith.train import plan

    lengths = {"llama-1b": (4096, 8192, 16384), "llama-3b": (4096, 8192), "qwen-0.5b": (4096, 8192)}
    out: dict[str, Any] = {"activation_memory_budget": fast.ACTIVATION_MEMORY_BUDGET, "rows": []}
    for shape, budgets in lengths.items():
        config = model_config(shape)
        samples = synth_samples(REGIMES["short"][4], "short", config.vocab_size)
        for method in ("full", "lora"):
            for tokens in budgets:
                r = guarded(f"{shape} {method} {tokens}", run_tunesmith, config, samples, method, True, tokens, rate,
                            max_steps=WARMUP_STEPS + 6)
                out["rows"].append(plan_check_row(shape, config, method, tokens, plan.Setting(adapter=method == "lora"),
                                                  r))
                if save:
                    save(out)
    return out


def compare(shape: str, regime: str, rate: float, n_samples: int, parity: bool, profile: bool,
            peers: bool = True, eager: bool = True, repeats: int = 1, variants: bool = False, big: bool = False,
            forms: bool = False, peer_defaults: bool = False, only: str = "", save: Any = None) -> dict[str, Any]:
    """Baselines (Trainer, TRL, Unsloth) and tunesmith (full, LoRA, and the variants asked for) on one shape.

    `only`: comma-separated row keys to run (`--rows`; empty: all); `peer_defaults`: also TRL with
    its default gradient checkpointing (slower than without wherever the model fits).

    Order matters: liger's instance patches also replace a few module-level functions of
    transformers (RoPE, the CausalLM forward), so every run that must not see them (the
    plain path, the compiled layers) goes before the first liger-patched run.
    """
    import torch._dynamo

    torch._dynamo.reset()  # each shape starts with empty compile caches, as its own `tunesmith train` would
    config = model_config(shape)
    samples = synth_samples(n_samples, regime, config.vocab_size)
    budget = REGIMES[regime][3]
    head = {"shape": shape, "regime": regime, "samples": n_samples, "real_tokens": sum(map(len, samples))}
    rows = SavedRows(head, save, only=only)  # a run cut short by its time limit keeps the rows it finished
    row = rows.run
    row("base_full", "Trainer full", run_trainer, config, samples, False, rate)
    row("base_lora", "Trainer+peft LoRA", run_trainer, config, samples, True, rate)
    if parity:
        row("plain_full", "tunesmith full (plain path)", run_tunesmith, config, samples, "full", False, budget, rate,
            max_steps=50)
    specs = {f"fast_{method}": (f"tunesmith {method}", run_tunesmith, (config, samples, method, True, budget, rate),
                                {"profile": profile}) for method in ("full", "lora")}
    specs = {key: spec for key, spec in specs.items() if rows.wants(key)}
    for method in ("full", "lora"):  # only on asking (--rows): the activation memory budget at torch's default
        if f"fast_{method}_no_budget" in rows.only:  # (taking turns with the rows above, on --repeats)
            specs[f"fast_{method}_no_budget"] = (
                f"tunesmith {method} (activation memory budget 1.0)", with_fast_settings,
                (run_tunesmith, config, samples, method, True, budget, rate),
                {"activation_memory_budget": 1.0, "label": " (activation memory budget 1.0)"})
    for key, result in repeated(specs, repeats).items():  # (SavedRows prints and saves each row it is given)
        rows[key] = result
    if variants:  # what the plan picks on this GPU without --batch-tokens (`tunesmith train`'s default)
        for method in ("full", "lora"):
            row(f"auto_{method}", f"tunesmith {method} (default budget)", run_tunesmith, config, samples, method, True,
                None, rate, label=" (budget: the plan's)")
    if forms:  # the other LoRA forms: the Function node (round 3's default), grouped calls as plain math (round 4's)
        # (the opaque custom-op form and grouped full linears were behind in round 4: --host-profile keeps rows)
        row("function_lora", "tunesmith lora (LoRA node as autograd.Function)", with_fast_settings, run_tunesmith,
            config, samples, "lora", True, budget, rate, lora_form="function",
            label=" (LoRA node as autograd.Function)")
        row("grouped_lora", "tunesmith lora (grouped, plain math)", with_fast_settings, run_tunesmith, config,
            samples, "lora", True, budget, rate, written_out=False, label=" (grouped, plain math)")
    if big:  # twice the plan's cap (train/plan.py AUTO_MAX_TOKENS): does a bigger micro-batch still pay?
        from tunesmith.train.plan import AUTO_MAX_TOKENS

        for method in ("full", "lora"):
            row(f"big_{method}", f"tunesmith {method} ({2 * AUTO_MAX_TOKENS} tokens)", run_tunesmith, config,
                samples, method, True, 2 * AUTO_MAX_TOKENS, rate, label=f" ({2 * AUTO_MAX_TOKENS} tokens)")
    if eager:
        for method in ("full", "lora"):
            row(f"eager_{method}", f"tunesmith {method} (eager layers)", with_fast_settings, run_tunesmith, config,
                samples, method, True, budget, rate, compile_layers=False, label=" (eager liger layers)")
    if peers:  # TRL without checkpointing (its faster form; as configured by default too, on asking), Unsloth
        for method, lora in (("full", False), ("lora", True)):
            name = f"TRL SFT {'LoRA' if lora else 'full'}"
            if peer_defaults:
                row(f"trl_{method}", name, run_trl, config, samples, lora, rate, budget)
            row(f"trl_nockpt_{method}", f"{name} (no checkpointing)", run_trl, config, samples, lora, rate, budget,
                checkpointing=False)
        from unsloth_rows import run_unsloth  # each row in a child process: Unsloth patches what it imports

        free_gpu()
        for method in ("full", "lora"):
            if rows.wants(f"unsloth_{method}"):
                rows[f"unsloth_{method}"] = run_unsloth(shape, regime, n_samples, method, rate, budget)
    out: dict[str, Any] = rows.table()
    pairs = [("parity", "plain_full", "fast_full", "full, plain vs fast path")]
    pairs += [(f"parity_{key}", default, key, f"{default} vs {key}")  # each variant against the default, same batches
              for key, default in (("function_lora", "fast_lora"), ("grouped_lora", "fast_lora"),
                                   ("fast_full_no_budget", "fast_full"), ("fast_lora_no_budget", "fast_lora"))]
    pairs += [(f"parity_compiled_{method}", f"eager_{method}", f"fast_{method}", f"{method}, eager vs compiled layers")
              for method in ("full", "lora")]
    out.update(pair_parities(rows, pairs))
    return out


PEERS = {method: (f"base_{method}", f"trl_{method}", f"trl_nockpt_{method}", f"unsloth_{method}")
         for method in ("full", "lora")} | {"qlora": ("base_qlora", "unsloth_qlora", "unsloth_nockpt_qlora")}
PEER_KEYS = {key for keys in PEERS.values() for key in keys}


# issue 18's targets: (what, run key, measure, bound, at least?); measures: "peer" speed / the best
# peer's, "mfu", "mem" peak / the Trainer's, "reserved" the same of the allocator's reserved
# peaks (what the process holds: cached blocks and CUDA graph pools), "full" speed / tunesmith full's
TARGETS = [("full >= 3x the best peer", "fast_full", "peer", 3.0, True),
           ("full >= 3x the best peer (default budget)", "auto_full", "peer", 3.0, True),
           ("full >= 60% MFU", "fast_full", "mfu", 0.60, True),
           ("full >= 60% MFU (default budget)", "auto_full", "mfu", 0.60, True),
           ("full memory <= 0.5x the Trainer's", "fast_full", "mem", 0.5, False),
           ("full memory <= 0.5x the Trainer's (reserved peaks)", "fast_full", "reserved", 0.5, False),
           ("LoRA >= 1.3x tunesmith full", "fast_lora", "full", 1.3, True),
           ("LoRA >= 1.3x tunesmith full (default budget)", "auto_lora", "full", 1.3, True),
           ("LoRA >= 3x the best peer", "fast_lora", "peer", 3.0, True),
           ("LoRA memory <= 0.5x Trainer+peft's", "fast_lora", "mem", 0.5, False),
           ("LoRA memory <= 0.5x Trainer+peft's (reserved peaks)", "fast_lora", "reserved", 0.5, False)]


def targets(result: dict[str, Any]) -> list[str]:
    """Each of issue 18's targets this result can check: the value, and met / NOT met."""
    runs = {k: r for k, r in result["runs"].items() if not r["error"] and r["tokens_per_s"] > 0}
    lines = []
    for what, key, measure, bound, at_least in TARGETS:
        method = "lora" if key.endswith("lora") else "full"
        peers = [runs[k]["tokens_per_s"] for k in PEERS[method] if k in runs]
        trainer = runs.get(PEERS[method][0])
        full = runs.get(key.replace("lora", "full"))
        memory = {"mem": "peak_gib", "reserved": "reserved_gib"}.get(measure)  # the peak a memory target reads
        if key not in runs or (measure == "peer" and not peers) or (measure == "full" and not full) or (
                memory and not (trainer and trainer.get(memory) and runs[key].get(memory))):
            continue
        r = runs[key]
        if measure == "peer":
            value = r["tokens_per_s"] / max(peers)
        elif memory:
            value = r[memory] / trainer[memory]
        elif measure == "full":
            value = r["tokens_per_s"] / full["tokens_per_s"]
        else:
            value = r["mfu"]
        met = value >= bound if at_least else value <= bound
        shown = f"{100 * value:.1f}%" if measure == "mfu" else f"{value:.2f}x"
        lines.append(f"target: {what}: {shown} {'met' if met else 'NOT met'}")
    if "parity" in result:
        worst = result["parity"]["max_rel_diff"]
        lines.append(f"target: loss parity fast vs plain <= 1%: {100 * worst:.2f}% {'met' if worst <= 0.01 else 'NOT met'}")
    return lines


def table(result: dict[str, Any]) -> list[str]:
    """Compact rows: real tokens/s, MFU, peak memory; tunesmith / the best peer (speed) and / the Trainer (memory)."""
    runs = result["runs"]
    lines = [f"== {result['shape']}, {result['regime']} samples ({result['real_tokens']:,} real tokens each run)",
             f"{'run':34} {'real tok/s':>11} {'MFU':>6} {'peak GiB':>9} {'reserved':>9} {'x best peer':>11} "
             f"{'mem x Trainer':>13}"]
    for key, r in runs.items():
        if r["error"]:
            lines.append(f"{r['name']:34} {r['error']}")
            continue
        method = "qlora" if "qlora" in key else "lora" if "lora" in key.split("_") else "full"
        peers = [runs[k] for k in PEERS[method] if k in runs and not runs[k]["error"]]
        ours = key not in PEER_KEYS
        best = max(peers, key=lambda b: b["tokens_per_s"]) if peers and ours else None
        trainer = runs.get(PEERS[method][0])
        speed = f"{r['tokens_per_s'] / best['tokens_per_s']:.2f}" if best else ""
        mem = (f"{r['peak_gib'] / trainer['peak_gib']:.2f}" if ours and trainer and not trainer["error"]
               and trainer["peak_gib"] else "")
        spread = r.get("repeats") or []
        reserved = f"{r['reserved_gib']:.1f}" if r.get("reserved_gib") else ""
        lines.append(f"{r['name']:34} {r['tokens_per_s']:>11,.0f} {100 * r['mfu']:>5.1f}% {r['peak_gib']:>9.1f} "
                     f"{reserved:>9} {speed:>11} {mem:>13}" + (f"   {len(spread)} runs: min {min(spread):,.0f} median "
                                                 f"{sorted(spread)[len(spread) // 2]:,.0f} max {max(spread):,.0f}"
                                                 if len(spread) > 1 else ""))
    for key, label in (("parity", "fast vs plain"), ("parity_compiled_full", "full: eager vs compiled layers"),
                       ("parity_compiled_lora", "LoRA: eager vs compiled layers"),
                       ("parity_function_lora", "LoRA: default vs Function node"),
                       ("parity_grouped_lora", "LoRA: default vs grouped plain math")):
        if key in result:
            p = result[key]
            lines.append(f"loss parity, {label}, first {p['steps']} steps, same batches (bf16): max rel diff "
                         f"{100 * p['max_rel_diff']:.2f}%, mean {100 * p['mean_rel_diff']:.2f}% "
                         f"(loss {p['plain_first']:.3f} -> {p['plain_last']:.3f} / {p['fast_last']:.3f})")
    return lines


def environment() -> dict[str, Any]:
    """Versions and device, for the JSON."""
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(), "python": sys.version.split()[0]}
    from importlib.metadata import version

    for name in ("peft", "liger-kernel", "triton", "accelerate", "trl", "datasets"):
        try:
            env[name] = version(name)
        except Exception as exc:  # report, do not fail: the bench shows the fallbacks too
            env[name] = f"unavailable ({type(exc).__name__})"
    return env


def write_json(report: dict[str, Any], out: str) -> None:
    """Everything measured, as `gpu_train.json` in `out`."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "gpu_train.json").write_text(json.dumps(report, indent=1))


def main() -> None:
    """Run the benchmark; print the table; write everything as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true",
                        help="instead: 1B/3B/Qwen-0.5B x full/LoRA x short/long (all but the default 1B short)")
    parser.add_argument("--dpo", action="store_true",
                        help="instead: DPO rows (tunesmith LoRA/full vs TRL's DPOTrainer), bench/dpo_rows.py")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_train.json")
    parser.add_argument("--qlora", action="store_true",
                        help="instead: QLoRA on the Llama-3.1-8B shape vs Trainer+peft+bitsandbytes (and Unsloth)")
    parser.add_argument("--eager", action="store_true", help="headline: also the eager liger-layer rows (round 1)")
    parser.add_argument("--forms", action="store_true",
                        help="headline: also the other LoRA node forms (autograd.Function, grouped plain math)")
    parser.add_argument("--big", action="store_true",
                        help="headline: also full/LoRA at twice the plan's token cap (32,768 tokens)")
    parser.add_argument("--auto", action="store_true",
                        help="headline: also full/LoRA at the plan's token budget (the call then nears 10 min)")
    parser.add_argument("--default-budget", action="store_true",
                        help="instead: tunesmith full/LoRA at the plan's token budget and TRL SFT full (--shape)")
    parser.add_argument("--card", type=float, default=0.0,
                        help="GiB: run as on a GPU of this size (the allocator capped, the plan sized against it)")
    parser.add_argument("--host-profile", action="store_true",
                        help="instead: where the host's time goes in tunesmith full and LoRA steps (--shape, short samples)")
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES),
                        help="--host-profile's and --default-budget's model shape")
    parser.add_argument("--repeats", type=int, default=1,
                        help="--sweep: run tunesmith's rows this often, taking turns (min / median / max)")
    parser.add_argument("--only", default="", help="--sweep: only these shape:regime pairs (comma-separated)")
    parser.add_argument("--rows", default="", help="only these rows (comma-separated keys, as in the JSON)")
    parser.add_argument("--trl-defaults", action="store_true",
                        help="headline, --sweep: also TRL as configured by default (gradient checkpointing on)")
    parser.add_argument("--plan-check-fast", action="store_true",
                        help="instead: the compiled fast path's measured peak vs the plan, 3 shapes x 2-3 budgets")
    parser.add_argument("--plan-check", action="store_true",
                        help="instead: measured peak memory vs `tunesmith plan`'s estimate, 1B/3B/8B shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_train.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    report: dict[str, Any] = {"env": environment()}
    if args.dpo:
        from dpo_rows import dpo_rows, dpo_table

        report["dpo"] = dpo_rows(sys.modules[__name__], save=lambda r: write_json({**report, "dpo": r}, args.out))
        write_json(report, args.out)
        print("\n".join(dpo_table(report["dpo"])))
        for r in report["dpo"]["runs"].values():
            for note in r["notes"]:
                print(f"[{r['name']}] {note}")
        return
    rate = report["matmul_tflops"] = matmul_tflops()
    print(f"{report['env']}\nbf16 matmul 8192^3: {rate:.0f} TFLOP/s (MFU denominator)", flush=True)
    if args.card:
        emulate_card(args.card)
        print(f"emulated card: {args.card:g} GiB (allocator capped; the memory plan sizes against it)", flush=True)
    if args.plan_check_fast:
        report["plan_check_fast"] = fast_plan_check(rate, lambda r: write_json({**report, "plan_check_fast": r},
                                                                               args.out))
        write_json(report, args.out)
        return
    if args.qlora or args.plan_check:
        import qlora  # bench/qlora.py (its own module, so this file stays the 16-bit bench)

        saved: dict[str, Path] = {}  # random models saved once for the 4-bit loads of both parts
        try:
            if args.qlora:
                saved["llama-8b"] = qlora.saved_random_model(qlora.shape_config(qlora.LLAMA_8B, False),
                                                             Path(tempfile.mkdtemp(prefix="qlora-bench-")))
                report["results"] = [qlora.qlora_rows(rate, REGIMES["short"][4] // 3, saved["llama-8b"],
                                                      lambda r: write_json({**report, "results": [r]}, args.out),
                                                      args.rows)]
                print("\n".join(table(report["results"][0])), flush=True)
            if args.plan_check:
                report["plan_check"] = qlora.plan_check(
                    rate, saved, lambda rows: write_json({**report, "plan_check": rows}, args.out))
        finally:
            for path in saved.values():
                shutil.rmtree(path.parent, ignore_errors=True)
        write_json(report, args.out)
        return
    if args.default_budget:  # what `tunesmith train` runs without --batch-tokens, beside the best full peer
        config = model_config(args.shape)
        samples = synth_samples(REGIMES["short"][4], "short", config.vocab_size)
        rows = SavedRows({"shape": args.shape, "regime": "short", "samples": len(samples),
                          "real_tokens": sum(map(len, samples)), "card_gib": args.card},
                         lambda part: write_json({**report, "results": [part]}, args.out), notes=True, only=args.rows)
        for method in ("full", "lora"):  # before TRL: liger's patches of transformers stay for the process
            rows.run(f"auto_{method}", f"tunesmith {method} (default budget)", run_tunesmith, config, samples,
                     method, True, None, rate, label=" (budget: the plan's)")
        rows.run("trl_full", "TRL SFT full", run_trl, config, samples, False, rate, REGIMES["short"][3])
        report["results"] = [rows.table()]
        write_json(report, args.out)
        print("\n".join(table(report["results"][0])))
        return
    if args.host_profile:  # the same batches through each form of the layers' matmuls, with host timings
        report["fused_adamw"] = fused_adamw_report()
        shape = args.shape
        config, samples = model_config(shape), synth_samples(REGIMES["short"][4], "short", SHAPES[shape]["vocab_size"])
        rows = SavedRows({"shape": shape, "regime": "short", "samples": len(samples),
                          "real_tokens": sum(map(len, samples))},
                         lambda part: write_json({**report, "results": [part]}, args.out), notes=True, only=args.rows)
        # (session 4's block-mask pair, and round 4's custom-op and grouped-linears rows, are in their JSON)
        variants = [("full", "full", "", {}), ("full_no_graphs", "full", " (no CUDA graphs)", {"cuda_graphs": False}),
                    ("full_late_read", "full", " (loss read late)", {"late_read": True}),
                    ("full_separate_clip", "full", " (clipping in a pass of its own)", {"separate_clip": True}),
                    ("full_linears", "full", " (linears grouped)", {"group_linears": True}),
                    ("full_no_budget", "full", " (activation memory budget 1.0)", {"activation_memory_budget": 1.0}),
                    ("lora_no_budget", "lora", " (activation memory budget 1.0)",
                     {"activation_memory_budget": 1.0, "lora_form": "grouped", "written_out": True}),
                    ("lora", "lora", " (LoRA Function)", {"lora_form": "function"}),
                    ("lora_op", "lora", " (LoRA custom op)", {"lora_form": "op"}),
                    ("lora_grouped", "lora", " (LoRA calls grouped, plain math)",
                     {"lora_form": "grouped", "written_out": False}),
                    ("lora_written", "lora", " (LoRA calls grouped, written-out node)",
                     {"lora_form": "grouped", "written_out": True}),
                    ("lora_no_graphs", "lora", " (no CUDA graphs)", {"cuda_graphs": False}),
                    ("lora_late_read", "lora", " (loss read late)", {"late_read": True}),
                    ("lora_ckpt_compiled", "lora", " (checkpointing: compiled layers)",
                     {"checkpointing": True, "compile_checkpointed": True}),
                    # last: liger's patches replace transformers' RoPE process-wide (see `compare`)
                    ("lora_ckpt", "lora", " (checkpointing: eager liger layers)",
                     {"checkpointing": True, "compile_checkpointed": False})]
        for key, method, label, settings in variants:
            rows.run(key, f"tunesmith {method}{label}", with_fast_settings, run_tunesmith, config, samples, method,
                     True, REGIMES["short"][3], rate, max_steps=40, profile="host", label=label, **settings)
        out = rows.table()
        pairs = [("parity_graphs_full", "full_no_graphs", "full", "full, CUDA graphs vs eager decoder"),
                 ("parity_graphs_lora", "lora_no_graphs", "lora_written", "lora, CUDA graphs vs eager decoder"),
                 ("parity_late_read_full", "full", "full_late_read", "full, loss read late vs early"),
                 ("parity_separate_clip_full", "full", "full_separate_clip", "full, clipping inside the step vs apart"),
                 ("parity_late_read_lora", "lora_written", "lora_late_read", "lora, loss read late vs early"),
                 ("parity_linears_full", "full", "full_linears", "full, default vs linears grouped"),
                 ("parity_budget_full", "full_no_budget", "full", "full, activation memory budget 1.0 vs 0.9"),
                 ("parity_budget_lora", "lora_no_budget", "lora_written", "lora, activation memory budget 1.0 vs 0.9"),
                 ("parity_op_lora", "lora", "lora_op", "lora, Function vs custom op"),
                 ("parity_grouped_lora", "lora", "lora_grouped", "lora, Function vs grouped calls"),
                 ("parity_written_lora", "lora", "lora_written", "lora, Function vs written-out grouped node"),
                 ("parity_ckpt_lora", "lora_ckpt", "lora_ckpt_compiled", "lora checkpointing, eager vs compiled layers")]
        out.update(pair_parities(rows, pairs))
        report["results"] = [out]
        write_json(report, args.out)
        return
    if args.sweep:  # the other shapes and regimes; the headline (1B, short) is the plain run
        results = []
        for shape, regime in SWEEP:
            if args.only and f"{shape}:{regime}" not in args.only.split(","):
                continue
            n = REGIMES[regime][4] // 3 if regime == "short" else REGIMES[regime][4] // 2
            results.append(compare(shape, regime, rate, n, parity=False, profile=False, repeats=args.repeats,
                                   peers=(shape, regime) == ("llama-3b", "short"), eager=False,
                                   peer_defaults=args.trl_defaults, only=args.rows,
                                   save=lambda part: write_json({**report, "results": [*results, part]}, args.out)))
            print("\n".join(table(results[-1]) + targets(results[-1])), flush=True)
            report["results"] = results
            write_json(report, args.out)  # after each shape: a run cut short still leaves its rows
        return
    report["fused_adamw"] = fused_adamw_report()
    # before the rows: TRL's liger patches (its rows run last) replace transformers' RMSNorm
    # process-wide, and liger's RMSNorm backward kernel does not compile inside our compiled layers
    policy = report["optimizer_policy"] = check_optimizer_policy()
    results = [compare("llama-1b", "short", rate, REGIMES["short"][4], parity=True, profile=True,
                       repeats=REPEATS, variants=args.auto, eager=args.eager, big=args.big, forms=args.forms,
                       peer_defaults=args.trl_defaults, only=args.rows,
                       save=lambda part: write_json({**report, "results": [part]}, args.out))]
    print("\n".join(table(results[0])), flush=True)
    report["results"] = results
    write_json(report, args.out)
    print("\n".join(["", *[line for r in results for line in table(r)], *targets(results[0])]))
    print(f"optimizer policy, bf16 + stochastic rounding vs fp32 master, {policy['steps']} steps: mean rel diff "
          f"{100 * policy['mean_rel_diff']:.2f}%, max over 20-step means {100 * policy['max_rel_diff_20step_mean']:.2f}% "
          f"(loss {policy['first_loss']:.3f} -> {policy['last_loss_fp32_master']:.3f} / {policy['last_loss_bf16_sr']:.3f})")
    print(fused_adamw_line(report["fused_adamw"]))
    for r in results[0]["runs"].values():
        for note in r["notes"]:
            print(f"[{r['name']}] {note}")


if __name__ == "__main__":
    main()
