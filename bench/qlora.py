"""QLoRA rows and the memory-plan check for bench/gpu_train.py (`--qlora`, `--plan-check`).

--qlora: Llama-3.1-8B shape, random weights saved once and loaded 4-bit NF4 (double quant,
bf16 compute) through `tunesmith.model.load` with the qlora parameter set's options; the
bench's short samples. Rows: tunesmith QLoRA (its loop, fast path, checkpointing and token
budget as `tunesmith train` picks them at 4k tokens), Trainer + peft + bitsandbytes QLoRA
(prepare_model_for_kbit_training, gradient checkpointing, batch 8, dynamic padding), and
Unsloth QLoRA with its own checkpointing and without, each in a child process from Unsloth's
carried site folder (bench/unsloth_rows.py; without that folder the rows say why), through
TRL's SFTTrainer with packing into rows of the same 4,096-token budget.

--plan-check: for the 1B / 3B / 8B shapes, LoRA and QLoRA with checkpointing at 4096 and
8192 tokens, the measured peak (torch.cuda.max_memory_allocated) beside `train.plan`'s
estimate without the CUDA context (which the allocator does not see), and the error.

bitsandbytes must be installed on the GPU machine (`pip install bitsandbytes-0.50.2-py3-none-
manylinux_2_24_x86_64.whl`, carried in: the machine has no network; the 43 MB wheel, pruned to
its CPU and CUDA 13 libraries as bench/README.md shows, fits the 64 MiB carry with the tree).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

import gpu_train as bench

LLAMA_8B = dict(family="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)
QLORA_TOKENS = 4096  # the target: peak <= 16 GiB at a 4k-token budget with checkpointing


def shape_config(spec: dict[str, Any], tied: bool) -> Any:
    """A transformers config of `spec` (Llama-3.1-8B is untied; the 1B/3B shapes are tied)."""
    from transformers import AutoConfig

    spec = dict(spec)
    family = spec.pop("family")
    return AutoConfig.for_model(family, tie_word_embeddings=tied, max_position_embeddings=8192,
                                rope_theta=500000.0, **spec)


def saved_random_model(config: Any, root: Path) -> Path:
    """Random bf16 weights of `config` written as safetensors (what a 4-bit load reads)."""
    path = root / "model"
    model = bench.build_model(config, torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    bench.free_gpu()
    return path


def n_params(config: Any) -> int:
    """Parameter count of the unquantised model (for MFU: 4-bit tensors report packed sizes)."""
    from tunesmith.train.plan import shape_from_config

    return shape_from_config(config.to_dict()).parameters


def run_tunesmith_adapter(config: Any, samples: list[list[int]], method: str, rate: float, batch_tokens: int | None,
                          path: Path | None = None, checkpointing: bool = False, max_steps: int | None = None,
                          label: str = "") -> Any:
    """tunesmith LoRA/QLoRA through its loader, parameter set, fast path (memory plan) and loop;
    `label` goes after the row's name (what a variant changed)."""
    from tunesmith.config import MethodOptions
    from tunesmith.data.tokenize import TokenizedSample
    from tunesmith.methods import OBJECTIVES, PARAMETER_SETS
    from tunesmith.model.fast import prepare_for_training
    from tunesmith.model.load import load_model
    from tunesmith.train.loop import DataPlan, Engine, total_steps
    from tunesmith.train.optim import make_optimizer
    from tunesmith.train.plan import Setting
    from tunesmith.train.schedule import cosine_schedule

    params, dev = PARAMETER_SETS[method], torch.device(bench.DEVICE)
    bench.free_gpu()
    if path is not None:
        model = load_model(str(path), device=dev, dtype=torch.bfloat16, **params.load_options(dev, torch.bfloat16))
    else:
        model = bench.build_model(config, torch.bfloat16)
    model = params.wrap(model, MethodOptions(method=method, lora_r=16, lora_alpha=32))
    memory = Setting(adapter=True, base_bits=params.base_bits)
    setup = prepare_for_training(model, device=dev, batch_tokens=batch_tokens, gradient_checkpointing=checkpointing,
                                 memory=memory)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=2e-4, seed=0)
    plan = DataPlan([TokenizedSample(s, s) for s in samples], setup.batch_tokens, seed=0)
    steps = total_steps(plan, 1, 1.0, max_steps)
    engine = Engine(model, optimizer, cosine_schedule(optimizer, steps), OBJECTIVES["sft"].make_loss(setup), dev)
    _state, records, tokens, seconds = bench.timed_train(engine, plan, steps, setup.batch_tokens)
    groups = [g for e in range(1 + steps // max(1, len(plan.groups(0)))) for g in plan.groups(e)]
    docs = [[len(plan.samples[i].input_ids) for i in g] for g in groups[bench.WARMUP_STEPS:steps]]
    flops = sum(bench.step_flops(config, n_params(config), d, True) for d in docs)
    from tunesmith.model import fast

    layers = "compiled layers" if fast.COMPILE_CHECKPOINTED else "eager liger layers"
    label += f" (checkpointing, {layers})" if checkpointing else ""
    result = bench.Result(f"tunesmith {method}{label}", tokens / seconds,
                          torch.cuda.max_memory_allocated() / 2**30,
                          flops / seconds / rate / 1e12, steps, tokens, seconds,
                          [r["train_loss"] for r in records if "train_loss" in r],
                          setup.notices + [f"batch_tokens={setup.batch_tokens} checkpointing={setup.checkpointing}"])
    del model, optimizer, engine, setup
    return result


def trainer_qlora_model(path: Path) -> Any:
    """The usual recipe: 4-bit NF4 load, prepare_model_for_kbit_training (checkpointing), peft LoRA r=16."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0 if bench.DEVICE == "cuda" else "cpu"},
                                                 attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def qlora_rows(rate: float, n_samples: int, path: Path, save: Any = None, only: str = "") -> dict[str, Any]:
    """tunesmith QLoRA vs Trainer+peft+bitsandbytes QLoRA (vs Unsloth QLoRA) on the 8B shape saved at `path`.

    Each row is printed (with its notes) and saved as soon as it ends (`SavedRows`), so a run cut short keeps them.
    `only`: comma-separated row keys to run (`--rows`); empty runs them all.
    """
    from unsloth_rows import run_unsloth

    config = shape_config(LLAMA_8B, tied=False)
    samples = bench.synth_samples(n_samples, "short", config.vocab_size)
    head = {"shape": "llama-8b", "regime": "short", "samples": n_samples, "real_tokens": sum(map(len, samples))}
    rows = bench.SavedRows(head, save, tag="qlora", notes=True, only=only)
    row = rows.run
    for key, checkpointing in (("unsloth_qlora", "unsloth"), ("unsloth_nockpt_qlora", "off")):  # child processes
        if rows.wants(key):
            bench.free_gpu()
            rows[key] = run_unsloth("llama-8b", "short", n_samples, "qlora", rate, QLORA_TOKENS, path, checkpointing)
    # tunesmith first: the Trainer recipe's prepare_model_for_kbit_training must not leave anything behind
    row("fast_qlora", "tunesmith qlora", run_tunesmith_adapter, config, samples, "qlora", rate, QLORA_TOKENS, path)
    row("fast_qlora_no_budget", "tunesmith qlora (activation memory budget 1.0)", bench.with_fast_settings,
        run_tunesmith_adapter, config, samples, "qlora", rate, QLORA_TOKENS, path, activation_memory_budget=1.0,
        label=" (activation memory budget 1.0)")  # torch's default: the compiled layers save what is fastest
    # the candidate, compiled layers under checkpointing (model/fast.py), before the eager checkpointed
    # row: that one patches liger's kernels into transformers process-wide (see gpu_train.compare)
    row("fast_qlora_ckpt_compiled", "tunesmith qlora (checkpointing, compiled layers)", bench.with_fast_settings,
        run_tunesmith_adapter, config, samples, "qlora", rate, QLORA_TOKENS, path, True, compile_checkpointed=True)
    row("fast_qlora_ckpt", "tunesmith qlora (checkpointing, eager liger layers)", bench.with_fast_settings,
        run_tunesmith_adapter, config, samples, "qlora", rate, QLORA_TOKENS, path, True, compile_checkpointed=False)
    row("base_qlora", "Trainer+peft+bnb QLoRA", bench.run_trainer, config, samples, True, rate,
        make_model=lambda: trainer_qlora_model(path), label="Trainer+peft+bnb QLoRA", n_params=n_params(config))
    table = rows.table()
    table["targets"] = qlora_targets(table["runs"])
    print("\n".join(table["targets"]), flush=True)
    table.update(bench.pair_parities(rows, [
        ("parity_ckpt_compiled", "fast_qlora_ckpt", "fast_qlora_ckpt_compiled",
         "qlora checkpointing, eager vs compiled layers"),
        ("parity_budget", "fast_qlora_no_budget", "fast_qlora", "qlora, activation memory budget 1.0 vs 0.9")]))
    return table


def qlora_targets(runs: dict[str, Any]) -> list[str]:
    """Issue 18's QLoRA target for each tunesmith row: >= 1.5x the faster Unsloth QLoRA row's tokens/s,
    at no more than that row's allocated peak memory."""
    unsloth = [r for k, r in runs.items() if k.startswith("unsloth") and not r["error"] and r["tokens_per_s"]]
    if not unsloth:
        return []
    best = max(unsloth, key=lambda r: r["tokens_per_s"])
    lines = []
    for key, r in runs.items():
        if key.startswith("fast_qlora") and not r["error"]:
            speed, mem = r["tokens_per_s"] / best["tokens_per_s"], r["peak_gib"] / best["peak_gib"]
            met = speed >= 1.5 and mem <= 1.0
            lines.append(f"target: {r['name']} >= 1.5x {best['name']} at no more memory: {speed:.2f}x, "
                         f"peak {r['peak_gib']:.1f} vs {best['peak_gib']:.1f} GiB: {'met' if met else 'NOT met'}")
    return lines


def plan_check(rate: float, saved: dict[str, Path], save: Any = None) -> list[dict[str, Any]]:
    """Measured peak vs the plan's estimate (allocator's view: without the CUDA context), 8B then 1B/3B.

    LoRA rows build the bf16 model on the GPU; QLoRA rows load `saved[shape]` (saved on first use).
    """
    from tunesmith.train import plan

    shapes = {"llama-8b": shape_config(LLAMA_8B, False), "llama-1b": shape_config(bench.SHAPES["llama-1b"], True),
              "llama-3b": shape_config(bench.SHAPES["llama-3b"], True)}
    out: list[dict[str, Any]] = []
    for name, config in shapes.items():
        samples = bench.synth_samples(600, "short", config.vocab_size)
        for method in ("qlora", "lora") if name == "llama-8b" else ("qlora",):
            for tokens in (4096, 8192):
                if method == "qlora" and name not in saved:
                    saved[name] = saved_random_model(config, Path(tempfile.mkdtemp(prefix="plan-check-")))
                r = bench.guarded(f"{name} {method}", run_tunesmith_adapter, config, samples, method, rate,
                                  tokens, saved.get(name) if method == "qlora" else None, True, bench.WARMUP_STEPS + 6)
                s = plan.Setting(adapter=True, base_bits=4 if method == "qlora" else 16, checkpointing=True)
                out.append(bench.plan_check_row(name, config, method, tokens, s, r))
                if save:
                    save(out)
        if name in saved:
            shutil.rmtree(saved.pop(name).parent, ignore_errors=True)
    return out
