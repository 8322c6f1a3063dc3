"""Preference rows of `bench/gpu_train.py --dpo`: tunesmith DPO (LoRA, full) vs TRL's DPOTrainer,
and ORPO LoRA vs TRL's (experimental) ORPOTrainer, same pairs.

Synthetic pairs on a random model of the Llama-3.2-1B shape (no network): prompt lengths
log-normal (median 160), chosen/rejected replies log-normal (median 120), ids from a
word-level tokenizer whose words ARE the ids ("t123" -> 123), so TRL tokenizes its text to
exactly the ids tunesmith trains on. tunesmith runs its real loop (`train.loop.train`) with
the DPO objective of the registry: LoRA uses the adapter switched off as the reference; full
runs the reference pass first (timed apart, as TRL's `precompute_ref_log_probs`). TRL:
DPOTrainer, bf16, batch 8 pairs, LoRA through peft (reference = adapter off, as ours) and full
with a reference model copy in memory (its default without precompute_ref_log_probs); ORPO
LoRA (no reference) through `trl.experimental.orpo`. Pairs/s after warm-up steps and peak memory.
"""
from __future__ import annotations

import math
import random
import tempfile
import time
from typing import Any

import torch

EOS = 1
LENGTHS = {"prompt": (160, 16, 1024), "reply": (120, 8, 512)}
BATCH_TOKENS = 16384
TRL_BATCH = 8


def synth_pairs(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids; chosen repeats the prompt's motif (learnable), rejected is random."""
    rng = random.Random(seed)

    def length(kind: str) -> int:
        median, lo, hi = LENGTHS[kind]
        return int(min(hi, max(lo, rng.lognormvariate(math.log(median), 0.6))))

    out = []
    for _ in range(n):
        motif = [rng.randrange(2, min(vocab, 32000)) for _ in range(rng.randint(8, 32))]
        prompt = (motif * 64)[:length("prompt")]
        chosen = (motif * 64)[:length("reply") - 1] + [EOS]
        rejected = [rng.randrange(2, min(vocab, 32000)) for _ in range(length("reply") - 1)] + [EOS]
        out.append((prompt, chosen, rejected))
    return out


def as_tokenized(pairs: list[tuple[list[int], list[int], list[int]]]) -> list[Any]:
    """tunesmith `TokenizedPair`s: prompt masked, replies trained through their EOS."""
    from tunesmith.data.pairs import TokenizedPair

    out = []
    for p, c, r in pairs:
        masked = [-100] * len(p)
        out.append(TokenizedPair(p + c + p + r, masked + c + masked + r, len(p) + len(c)))
    return out


def run_tunesmith_dpo(bench: Any, config: Any, pairs: list[Any], method: str, rate: float,
                      objective: str = "dpo") -> Any:
    """tunesmith DPO (or ORPO) through the one loop; pairs/s after warm-up (DPO's reference pass
    timed apart for full)."""
    from tunesmith.config import MethodOptions
    from tunesmith.data.packing import collate_pairs
    from tunesmith.methods import OBJECTIVES, PARAMETER_SETS
    from tunesmith.model.fast import prepare_for_training
    from tunesmith.train.loop import DataPlan, Engine, total_steps
    from tunesmith.train.optim import make_optimizer
    from tunesmith.train.reference import attach, score_pairs
    from tunesmith.train.schedule import cosine_schedule

    device = torch.device(bench.DEVICE)
    bench.free_gpu()
    model = bench.build_model(config, torch.bfloat16)
    options = MethodOptions(method=method, objective=objective, lora_r=16, lora_alpha=32)
    model = PARAMETER_SETS[method].wrap(model, options)
    setup = prepare_for_training(model, device=device, batch_tokens=BATCH_TOKENS)
    samples = as_tokenized(pairs)
    notes = list(setup.notices)
    loss_fn = OBJECTIVES[objective].make_loss(setup, options)
    if objective == "dpo" and not PARAMETER_SETS[method].adapter:  # as `tunesmith train` does (train/reference.py)
        start = time.perf_counter()
        attach(samples, score_pairs(model, samples, BATCH_TOKENS, device, logps=loss_fn.logps))
        notes.append(f"reference pass: {len(samples) / (time.perf_counter() - start):,.0f} pairs/s")
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad],
                               lr=OBJECTIVES[objective].default_lr(PARAMETER_SETS[method].adapter), weight_decay=0.0, seed=0)
    plan = DataPlan(samples, BATCH_TOKENS, seed=0, collate_fn=collate_pairs)
    steps = total_steps(plan, 1, 1.0, None)
    scheduler = cosine_schedule(optimizer, steps)
    groups = plan.groups(0)
    engine = Engine(model, optimizer, scheduler, loss_fn, device)
    _state, records, tokens, seconds = bench.timed_train(engine, plan, steps, BATCH_TOKENS)
    timed = sum(len(g) for g in groups[bench.WARMUP_STEPS:steps])
    history = [r for r in records if "train_loss" in r]
    notes.append(f"reward accuracy last step {history[-1].get('reward_accuracy', float('nan')):.2f}")
    result = bench.Result(f"tunesmith {objective.upper()} {method}", tokens / seconds,
                          torch.cuda.max_memory_allocated() / 2**30, 0.0, steps, tokens,
                          seconds, [r["train_loss"] for r in history], notes)
    result.notes.insert(0, f"pairs/s {timed / seconds:,.1f}")
    result.pairs_per_s = timed / seconds  # type: ignore[attr-defined]
    del model, optimizer, scheduler, setup, loss_fn, engine
    return result


def words_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer whose word "tN" is id N, so text round-trips to the synthetic ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{EOS}", pad_token="t0", unk_token="t0")


def run_trl_dpo(bench: Any, config: Any, pairs: list[tuple[list[int], list[int], list[int]]], lora: bool,
                objective: str = "dpo") -> Any:
    """TRL's DPOTrainer (or ORPOTrainer) on the same pairs (bf16, batch 8 pairs); pairs/s after warm-up, peak memory."""
    from datasets import Dataset

    if objective == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

    name = f"TRL {Trainer.__name__} " + ("LoRA" if lora else "full")
    bench.free_gpu()
    model = bench.build_model(config, torch.bfloat16)
    text = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    data = Dataset.from_list([{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
                              for p, c, r in pairs])
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    marks: dict[int, float] = {}

    with tempfile.TemporaryDirectory() as tmp:
        args = Config(output_dir=tmp, per_device_train_batch_size=TRL_BATCH, bf16=bench.DEVICE == "cuda",
                      num_train_epochs=1, learning_rate=5e-6 if lora else 5e-7, beta=0.1, max_length=2048,
                      logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                      dataloader_num_workers=0)
        reference = None if lora or objective == "orpo" else bench.build_model(config, torch.bfloat16)  # same seed
        extra = {} if objective == "orpo" else {"ref_model": reference}
        trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=words_tokenizer(config.vocab_size),
                          peft_config=peft_config, callbacks=[bench.step_clock(marks)], **extra)
        trainer.train()
    steps = max(marks)
    seconds = marks[steps] - marks[bench.WARMUP_STEPS]
    timed = min(len(pairs), steps * TRL_BATCH) - bench.WARMUP_STEPS * TRL_BATCH
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs[bench.WARMUP_STEPS * TRL_BATCH:steps * TRL_BATCH])
    result = bench.Result(name, tokens / seconds, torch.cuda.max_memory_allocated() / 2**30, 0.0, steps, tokens,
                          seconds, notes=[f"pairs/s {timed / seconds:,.1f}"])
    result.pairs_per_s = timed / seconds  # type: ignore[attr-defined]
    del trainer, model, reference
    return result


def dpo_rows(bench: Any, shape: str = "llama-1b", n_pairs: int = 800, save: Any = None) -> dict[str, Any]:
    """tunesmith DPO LoRA and full and ORPO LoRA, and TRL's trainers (if importable) on the same pairs.

    Each row is printed (and `save(out)` called) when it ends, so a run cut short keeps its rows.
    """
    import importlib.util
    from dataclasses import asdict

    config = bench.model_config(shape)
    pairs = synth_pairs(n_pairs, config.vocab_size)
    have_trl = importlib.util.find_spec("trl") is not None
    out: dict[str, Any] = {"shape": shape, "pairs": n_pairs, "runs": {},
                           "skipped": None if have_trl else "TRL rows skipped: trl is not importable (pip install trl)"}
    jobs = [("ours_lora", "tunesmith DPO lora", run_tunesmith_dpo, (bench, config, pairs, "lora", 0.0)),
            ("ours_full", "tunesmith DPO full", run_tunesmith_dpo, (bench, config, pairs, "full", 0.0)),
            ("ours_orpo_lora", "tunesmith ORPO lora", run_tunesmith_dpo, (bench, config, pairs, "lora", 0.0, "orpo"))]
    if have_trl:  # after ours: TRL's trainers may patch transformers for the rest of the process
        jobs += [("trl_lora", "TRL DPOTrainer LoRA", run_trl_dpo, (bench, config, pairs, True)),
                 ("trl_full", "TRL DPOTrainer full", run_trl_dpo, (bench, config, pairs, False)),
                 ("trl_orpo_lora", "TRL ORPOTrainer LoRA", run_trl_dpo, (bench, config, pairs, True, "orpo"))]
    for key, name, fn, args in jobs:
        r = bench.guarded(name, fn, *args)
        out["runs"][key] = {**asdict(r), "pairs_per_s": getattr(r, "pairs_per_s", 0.0)}
        print(f"[dpo] {name}: {out['runs'][key]['pairs_per_s']:,.1f} pairs/s, {r.tokens_per_s:,.0f} tok/s, "
              f"peak {r.peak_gib:.2f} GiB" + (f", {r.error}" if r.error else "") + f" {r.notes}", flush=True)
        if save:
            save(out)
    return out


def dpo_table(result: dict[str, Any]) -> list[str]:
    """pairs/s, real tokens/s, peak memory and ratios vs TRL."""
    runs = result["runs"]
    lines = [f"== DPO / ORPO, {result['shape']}, {result['pairs']} synthetic pairs",
             f"{'run':26} {'pairs/s':>9} {'tok/s':>9} {'peak GiB':>9} {'speed x':>8} {'mem x':>7}"]
    base_of = {"ours_lora": "trl_lora", "ours_full": "trl_full", "ours_orpo_lora": "trl_orpo_lora"}
    for key, r in runs.items():
        if r["error"]:
            lines.append(f"{r['name']:26} {r['error']}")
            continue
        b = runs.get(base_of.get(key, ""), {})
        ok = b and not b["error"] and b["pairs_per_s"]
        speed = f"{r['pairs_per_s'] / b['pairs_per_s']:.2f}" if ok else ""
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}" if ok and b['peak_gib'] else ""
        lines.append(f"{r['name']:26} {r['pairs_per_s']:>9,.1f} {r['tokens_per_s']:>9,.0f} {r['peak_gib']:>9.1f} "
                     f"{speed:>8} {mem:>7}")
    if result["skipped"]:
        lines.append(result["skipped"])
    return lines
