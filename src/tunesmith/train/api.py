"""`finetune(...)`: the Python API of training; `tunesmith train` is a thin layer over it.

The run, in named steps: resolve options -> find the checkpoint to resume (or clear the
previous run) -> `setup_run` (recipe = parameter set x objective from `tunesmith.methods`;
tokenizer + data; model loaded and wrapped by the parameter set, fast path; the
objective's loss) -> `train_run` (engine: optimizer + schedule; resume; base eval; the
ONE loop; final eval) -> `write_outputs` (model, plot, summary) -> the report.
"""
from __future__ import annotations

import dataclasses
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunesmith.config import TrainConfig, to_flat_dict, train_config
from tunesmith.errors import UserError
from tunesmith.methods import Recipe
from tunesmith.train.checkpoint import TrainState, checkpoint_dirs, load_checkpoint, save_checkpoint
from tunesmith.train.files import CHECKPOINTS_DIR, HELD_OUT_FILE, PLOT_FILE, SUMMARY_FILE, TENSORBOARD_DIR
from tunesmith.train.losses import LossFn
from tunesmith.train.progress import RunLog, format_summary, plot_losses

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunesmith.data.packing import Batch
    from tunesmith.data.prepare import PreparedData
    from tunesmith.train.loop import DataPlan, Engine


@dataclass
class TrainResult:
    """Where the trained model went and the run's final figures."""

    output_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """The pieces of one run, built by `setup_run` (plain values, no behaviour)."""

    config: TrainConfig
    recipe: Recipe
    output_dir: Path
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    prepared: PreparedData
    model: PreTrainedModel | None  # a peft model for adapter methods; None once freed for the report
    loss_fn: LossFn
    padded: bool  # True: the attention cannot keep packed samples apart, so batches are padded
    notices: list[str]


def resolve_config(config: TrainConfig | None, options: dict[str, Any]) -> TrainConfig:
    """A config from a `TrainConfig`, flat option names, or a config overridden by options."""
    if config is None:
        return train_config(options)
    if options:
        return train_config({**to_flat_dict(config), **options})
    return config


def find_resume_checkpoint(output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (or None); refuse to overwrite an unfinished run by accident."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: exists and is not a directory (choose another --output)")
    existing = checkpoint_dirs(output_dir / CHECKPOINTS_DIR)
    if resume:
        if not existing:
            raise UserError(f"--resume: no checkpoint in {output_dir / CHECKPOINTS_DIR} "
                            "(checkpoints are written every --save-every steps)")
        return existing[-1]
    if existing and not (output_dir / SUMMARY_FILE).is_file():
        raise UserError(f"{output_dir}: holds an unfinished run (checkpoint {existing[-1].name})",
                        ["pass --resume to continue it, choose another --output, or delete "
                         f"{output_dir / CHECKPOINTS_DIR} to start over"])
    return None


def clear_previous_run(output_dir: Path) -> None:
    """A finished earlier run in the same directory is replaced: its checkpoints, logs and summary go.

    The summary goes first, so until this run finishes the directory holds no finished run
    (a crash cannot pass for a finished one).
    """
    (output_dir / SUMMARY_FILE).unlink(missing_ok=True)
    for old in (CHECKPOINTS_DIR, TENSORBOARD_DIR):
        shutil.rmtree(output_dir / old, ignore_errors=True)


def seed_everything(seed: int) -> None:
    """Seed every RNG the run draws from (adapter init, dropout)."""
    random.seed(seed)
    torch.manual_seed(seed)


def setup_run(config: TrainConfig, output_dir: Path) -> Run:
    """Tokenizer, data, model with its parameter set and fast path, the objective's loss."""
    from tunesmith.data.prepare import prepare_data
    from tunesmith.model.adapters import count_parameters
    from tunesmith.model.fast import prepare_for_training
    from tunesmith.model.load import load_model, load_tokenizer, pick_device_dtype, resolve_model_name
    from tunesmith.train.losses import packing_is_exact

    from tunesmith.train.optim import check_optimizer_installed

    chosen = config.method.recipe()
    chosen.check_installed()
    check_optimizer_installed(config.loop.optim)
    device, dtype = pick_device_dtype()
    name = resolve_model_name(config.model.model)
    tokenizer = load_tokenizer(name, config.model.trust_remote_code)
    data_options = (dataclasses.replace(config.data, train_on_prompt=True) if chosen.objective.train_all_tokens
                    else config.data)
    prepared = prepare_data(data_options, tokenizer, seed=config.loop.seed, cache_dir=output_dir / ".cache",
                            log=lambda line: print(line, file=sys.stderr), check_kinds=chosen.check_data)
    seed_everything(config.loop.seed)
    model = load_model(name, device=device, dtype=dtype, trust_remote_code=config.model.trust_remote_code,
                       merge_adapter=True,  # training from a tunesmith LoRA output starts from its merged weights
                       **chosen.params.load_options(device, dtype))
    model.config.use_cache = False  # training never reuses a KV cache
    model = chosen.params.wrap(model, config.method)
    fast = prepare_for_training(model, device=device, batch_tokens=config.loop.batch_tokens,
                                fast_kernels=config.loop.fast_kernels,
                                gradient_checkpointing=config.loop.gradient_checkpointing,
                                memory=memory_setting(config))
    config = dataclasses.replace(config, loop=dataclasses.replace(  # what ran is what config.yaml records
        config.loop, batch_tokens=fast.batch_tokens, gradient_checkpointing=fast.checkpointing))
    trainable, total = count_parameters(model)
    notices = [*fast.notices, f"model: {name} on {device} ({str(dtype).removeprefix('torch.')}), "
               f"method {chosen.params.name}, objective {chosen.objective.name}: "
               f"{trainable:,} of {total:,} parameters train"]
    padded = fast.loss_sum is None and not packing_is_exact(model, device)  # the fast path packs by design
    if padded:
        notices.append("batches: padded (this model's attention does not separate packed samples)")
    return Run(config, chosen, output_dir, device, tokenizer, prepared, model, chosen.objective.make_loss(fast),
               padded, notices)


def memory_setting(config: TrainConfig) -> Any:
    """What the memory plan needs to know of this run's method and optimizer (`train.plan.Setting`)."""
    from tunesmith.train.plan import Setting

    params = config.method.recipe().params
    return Setting(adapter=params.adapter, base_bits=params.base_bits, optim=config.loop.optim,
                   lora_r=config.method.lora_r)


def saved_batch_tokens(config: TrainConfig, output_dir: Path) -> TrainConfig:
    """On --resume without --batch-tokens: the budget the run started with (the data order depends on it)."""
    import yaml

    from tunesmith.train.files import CONFIG_FILE

    saved = output_dir / CONFIG_FILE
    if config.loop.batch_tokens is not None or not saved.is_file():
        return config
    tokens = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("batch_tokens")
    return dataclasses.replace(config, loop=dataclasses.replace(config.loop, batch_tokens=tokens))


def build_engine(run: Run, steps: int) -> Engine:
    """AdamW over the trainable parameters (dtype policy: `train.optim`) and the cosine schedule."""
    from tunesmith.train.loop import Engine
    from tunesmith.train.optim import make_optimizer
    from tunesmith.train.schedule import cosine_schedule

    loop = run.config.loop
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=run.config.peak_lr(), weight_decay=loop.weight_decay, seed=loop.seed,
                               optim=loop.optim)
    return Engine(run.model, optimizer, cosine_schedule(optimizer, steps, loop.warmup_ratio), run.loss_fn,
                  run.device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 2**20


def finetune(config: TrainConfig | None = None, **options: Any) -> TrainResult:
    """Fine-tune a model; returns the output directory and final metrics.

    `finetune(model="x", data="y.jsonl", method="lora", max_steps=10)` takes the same
    option names as the CLI flags and YAML keys.
    """
    config = resolve_config(config, options)
    output_dir = Path(config.output.output).expanduser()
    resume_from = find_resume_checkpoint(output_dir, config.loop.resume)
    if resume_from is None:
        clear_previous_run(output_dir)
    else:
        config = saved_batch_tokens(config, output_dir)
    started = time.perf_counter()
    try:
        run = setup_run(config, output_dir)
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)  # this run's peak, not an earlier one's in this process
        history, state, final = train_run(run, resume_from)
        metrics = write_outputs(run, history, state, final, time.perf_counter() - started)
    except torch.OutOfMemoryError:
        raise UserError("out of GPU memory", oom_advice(config)) from None
    except KeyboardInterrupt:
        saved = checkpoint_dirs(output_dir / CHECKPOINTS_DIR)
        if saved:
            print(f"stopped; `--resume` continues from {saved[-1]}", file=sys.stderr)
        raise
    if config.output.report:
        _final_report(output_dir, metrics, run)
    return TrainResult(output_dir, metrics)


def oom_advice(config: TrainConfig) -> list[str]:
    """What to change after running out of GPU memory: the memory plan's advice for this card."""
    from tunesmith.model.load import resolve_model_name
    from tunesmith.train import plan

    lines = [f"fix: lower --batch-tokens (now {config.loop.batch_tokens or 'chosen by the plan'}), "
             "add --gradient-checkpointing, or use --method lora / qlora"]
    try:
        raw, name = plan.read_config(resolve_model_name(config.model.model))
        shape = plan.shape_from_config(raw, name)
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    except (UserError, RuntimeError, AssertionError):  # no config to read, or no CUDA to size against
        return lines
    return [*lines, plan.advice(shape, memory_setting(config), total)]


def data_plan(run: Run) -> tuple[DataPlan, list[Batch]]:
    """How the training samples become batches, and the held-out batches."""
    from tunesmith.data.packing import pack
    from tunesmith.train.loop import DataPlan

    loop = run.config.loop
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    plan = DataPlan(run.prepared.train, loop.batch_tokens, loop.seed, padded=run.padded, pad_id=pad_id)
    return plan, pack(run.prepared.eval, loop.batch_tokens, padded=run.padded, pad_id=pad_id)


def train_run(run: Run, resume_from: Path | None) -> tuple[list[dict[str, Any]], TrainState, dict[str, float]]:
    """Engine, (resume), base eval, the loop, final eval: returns the log history, state and final eval."""
    from tunesmith.data.readers import write_jsonl
    from tunesmith.train.loop import record_eval, total_steps, train
    from tunesmith.train.output import save_config

    config, loop, out = run.config, run.config.loop, run.output_dir
    plan, eval_batches = data_plan(run)
    steps = total_steps(plan, loop.grad_accum, loop.epochs, loop.max_steps)
    engine = build_engine(run, steps)
    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, run.model, engine.optimizer, engine.scheduler)
    save_config(out, to_flat_dict(config))
    write_jsonl(run.prepared.eval_conversations, out / HELD_OUT_FILE)
    log = RunLog(out, steps, start_step=state.step, history=state.history)
    for line in run.notices + [f"training: {steps} steps, peak lr {config.peak_lr():g}"
                               + (f", resumed at step {state.step} from {resume_from}" if resume_from else "")]:
        log.message(line)

    def save(s: TrainState) -> Path:
        return save_checkpoint(out / CHECKPOINTS_DIR, run.model, engine.optimizer, engine.scheduler, s,
                               loop.keep_checkpoints)

    try:
        if state.step == 0 and eval_batches:
            record_eval(engine, eval_batches, state, log)
            state.best_eval_loss = None  # the base model's loss is not a result of this run
        state = train(engine, plan, eval_batches, loop, state, steps, log, save)
        final = record_eval(engine, eval_batches, state, log) if eval_batches else {}
    finally:
        log.close()
    return log.history, state, final


def write_outputs(run: Run, history: list[dict[str, Any]], state: TrainState, final: dict[str, float],
                  seconds: float) -> dict[str, float]:
    """The model (or adapter, and merged weights), the loss plot and the summary; returns the metrics."""
    from tunesmith.train.output import adapter_stop_notice, save_model, save_summary

    out = run.output_dir
    notice = adapter_stop_notice(run.model, run.tokenizer, run.prepared.end_of_turn_ids, out)
    save_model(run.model, run.tokenizer, out, run.prepared.end_of_turn_ids,
               merge=run.recipe.params.merge if run.config.method.merge else None)
    metrics = run_metrics(history, state, final, run.device, seconds)
    plot_losses(history, out / PLOT_FILE)
    save_summary(out, metrics)
    print(format_summary(metrics), file=sys.stderr)
    if notice:
        print(notice, file=sys.stderr)
    return metrics


def run_metrics(history: list[dict[str, Any]], state: TrainState, final: dict[str, float],
                device: torch.device, seconds: float) -> dict[str, float]:
    """The figures a run reports: eval losses (base, final, best), steps, tokens, speed, memory."""
    train_records = [r for r in history if "train_loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    base = next((r["eval_loss"] for r in evals if r["step"] == 0), None)
    metrics: dict[str, Any] = {
        "steps": state.step, "tokens": state.tokens, "seconds": seconds,
        "tokens_per_s": train_records[-1]["tokens_per_s"] if train_records else 0.0,
        "final_train_loss": train_records[-1]["train_loss"] if train_records else None,
        "base_eval_loss": base, "final_eval_loss": final.get("eval_loss"),
        "final_eval_perplexity": final.get("eval_perplexity"), "best_eval_loss": state.best_eval_loss,
        "peak_memory_gib": peak_memory_gib(device),
    }
    return {k: v for k, v in metrics.items() if v is not None}


def _final_report(output_dir: Path, metrics: dict[str, float], run: Run) -> None:
    """The end-of-run base-vs-tuned report on up to 20 held-out prompts (off with --no-report).

    The tuned model is reloaded from `output_dir`, so the report measures exactly what was
    saved (not the in-memory model with training-only kernels patched in).
    """
    from tunesmith.eval.report import report_after_training
    from tunesmith.model.load import load_model, load_tokenizer

    if "base_eval_loss" in metrics and "final_eval_loss" in metrics:
        print(f"held-out loss: base {metrics['base_eval_loss']:.4f} -> tuned {metrics['final_eval_loss']:.4f}",
              file=sys.stderr)
    conversations = [c for c in run.prepared.eval_conversations if c.kind == "chat"]
    if not conversations:
        print("report: skipped (no held-out chat samples; set --test-split or --eval-data)", file=sys.stderr)
        return
    run.model = None  # free the training copy before loading the saved one
    tuned = load_model(str(output_dir), device=run.device)
    report_after_training(tuned, load_tokenizer(str(output_dir)), conversations, output_dir,
                          run.config.model.model)
