"""`finetune(...)`: the Python API of training; `tunesmith train` is a thin layer over it.

The run, in named steps: resolve options -> find the checkpoint to resume (or clear the
previous run) -> `setup_run` (recipe = parameter set x objective from `tunesmith.methods`;
tokenizer + data; model loaded and wrapped by the parameter set, fast path; the
objective's loss) -> `train_run` (engine: optimizer + schedule; resume; base eval; the
ONE loop; final eval) -> `write_outputs` (model, plot, summary) -> the report.

Under torchrun every rank runs this (`train.distributed`): rank 0 alone clears and writes
the output directory and logs; the model is wrapped (DDP or FSDP2) after the parameter set
and the fast path; checkpoints are written by every rank; the saved model is gathered
into one normal HF directory; the report runs on rank 0 once the others are done.
"""
from __future__ import annotations

import dataclasses
import errno
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunesmith.config import TrainConfig, run_record, starter_defaults, to_flat_dict, train_config
from tunesmith.errors import UserError
from tunesmith.methods import Recipe
from tunesmith.train.checkpoint import TrainState, checkpoint_dirs, load_checkpoint, save_checkpoint, write_failed
from tunesmith.train.distributed import Dist, choose_wrapper, failure_guard, full_state_dict, share_batches, wrap
from tunesmith.train.files import CHECKPOINTS_DIR, HELD_OUT_FILE, PLOT_FILE, SUMMARY_FILE, TENSORBOARD_DIR
from tunesmith.train.lock import output_lock
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
    dist: Dist = field(default_factory=Dist)  # this process's rank and world (one process: a no-op)
    dtype: torch.dtype = torch.float32  # the run's dtype (what the saved model is written in)
    origins: dict[str, str] = field(default_factory=dict)  # option -> where it came from (config.yaml's sources)

    @property
    def pad_id(self) -> int:
        """The id padding is filled with: the tokenizer's pad token, else 0 (masked either way)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


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


def start_output(output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; without one, a finished earlier run in `output_dir` is cleared."""
    resume_from = find_resume_checkpoint(output_dir, resume)
    if resume_from is None:
        clear_previous_run(output_dir)
    return resume_from


def setup_run(config: TrainConfig, output_dir: Path, dist: Dist | None = None) -> Run:
    """Tokenizer, data, model with its parameter set, fast path and data-parallel wrapper, the loss."""
    from tunesmith.data.prepare import prepare_data
    from tunesmith.model.adapters import count_parameters
    from tunesmith.model.fast import prepare_for_training
    from tunesmith.model.load import load_model, load_tokenizer, pick_device_dtype, resolve_model_name
    from tunesmith.train.losses import packing_is_exact

    from tunesmith.train.optim import check_optimizer_installed

    dist = dist or Dist()
    chosen = config.method.recipe()
    chosen.check_installed()
    check_optimizer_installed(config.loop.optim)
    wrapper = choose_wrapper(config.distributed.parallel, chosen.params.adapter)
    if dist.enabled and wrapper == "fsdp" and config.method.merge:
        raise UserError("--merge cannot fold an adapter sharded by --parallel fsdp",
                        ["fix: use --parallel ddp (what auto picks for adapters), or drop --merge"])
    device, dtype = pick_device_dtype()
    name = resolve_model_name(config.model.model)
    tokenizer = load_tokenizer(name, config.model.trust_remote_code)
    data_options = (dataclasses.replace(config.data, train_on_prompt=True) if chosen.objective.train_all_tokens
                    else config.data)
    say = (lambda line: print(line, file=sys.stderr)) if dist.is_main else (lambda line: None)
    prepared = dist.main_first(lambda: prepare_data(  # rank 0 reads, checks and caches; the others then load the cache
        data_options, tokenizer, seed=config.loop.seed, cache_dir=output_dir / ".cache", log=say,
        check_kinds=chosen.check_data, tokenize=chosen.objective.tokenize))
    seed_everything(config.loop.seed)
    model = load_model(name, device=device, dtype=dtype, trust_remote_code=config.model.trust_remote_code,
                       merge_adapter=True,  # training from a tunesmith LoRA output starts from its merged weights
                       **chosen.params.load_options(device, dtype))
    model.config.use_cache = False  # training never reuses a KV cache
    model = chosen.params.wrap(model, config.method)
    fast = prepare_for_training(model, device=device, batch_tokens=config.loop.batch_tokens,
                                fast_kernels=config.loop.fast_kernels,
                                gradient_checkpointing=config.loop.gradient_checkpointing,
                                memory=memory_setting(config), cuda_graphs=not dist.enabled,
                                longest_sample=max((len(s.input_ids) for s in prepared.train), default=0),
                                accumulates=config.loop.grad_accum > 1)
    config = dataclasses.replace(config, loop=dataclasses.replace(  # what ran is what config.yaml records
        config.loop, batch_tokens=fast.batch_tokens, gradient_checkpointing=fast.checkpointing))
    trainable, total = count_parameters(model)
    notices = [*fast.notices, f"model: {name} on {device} ({str(dtype).removeprefix('torch.')}), "
               f"method {chosen.params.name}, objective {chosen.objective.name}: "
               f"{trainable:,} of {total:,} parameters train"]
    padded = fast.loss_sum is None and not packing_is_exact(model, device)  # the fast path packs by design
    if padded:
        notices.append("batches: padded (this model's attention does not separate packed samples)")
    run = Run(config, chosen, output_dir, device, tokenizer, prepared, model,
              chosen.objective.make_loss(fast, config.method), padded, notices, dist, dtype)
    if chosen.objective.before_training is not None:
        chosen.objective.before_training(run)  # e.g. DPO's reference pass, while the weights are still the base
    run.loss_fn = wrap(dist, model, run.loss_fn, wrapper, device, dtype, cpu_offload=config.distributed.cpu_offload)
    if dist.enabled:
        notices.append(f"parallel: {wrapper} on {dist.world} processes")
    return run


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
                  run.device, run.dist)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 2**20


def finetune(config: TrainConfig | None = None, *, origins: dict[str, str] | None = None,
             **options: Any) -> TrainResult:
    """Fine-tune a model; returns the output directory and final metrics.

    `finetune(model="x", data="y.jsonl", method="lora", max_steps=10)` takes the same
    option names as the CLI flags and YAML keys. `origins` (option -> "flag --lr", ...,
    from the CLI) is recorded in config.yaml; without it, options that differ from their
    defaults are recorded as "given".
    """
    from tunesmith.config_file import setting_origins
    from tunesmith.model.load import pick_device_dtype
    from tunesmith.train.distributed import start

    starter = set(starter_defaults(options)) if config is None else set()
    config = resolve_config(config, options)
    origins = origins if origins is not None else setting_origins(config, {}, starter)
    output_dir = Path(config.output.output).expanduser()
    dist = start(pick_device_dtype()[0].type)
    try:
        with output_lock(output_dir), failure_guard(dist, output_dir / CHECKPOINTS_DIR):  # one run per output dir
            metrics, run = train_and_save(config, output_dir, dist, origins)
    finally:
        dist.close()
    if config.output.report and dist.is_main:
        _final_report(output_dir, metrics, run)
    if config.output.export and dist.is_main:  # --export gguf|ollama|merged: as `tunesmith export OUTPUT --to ...`
        from tunesmith.export.api import export_after_training

        export_after_training(output_dir, config.output.export)
    return TrainResult(output_dir, metrics)


def train_and_save(config: TrainConfig, output_dir: Path, dist: Dist,
                   origins: dict[str, str] | None = None) -> tuple[dict[str, float], Run]:
    """Set up, train and write the outputs; out-of-memory, a full disk and Ctrl-C become advice."""
    resume_from = dist.on_main(lambda: start_output(output_dir, config.loop.resume))
    if resume_from is not None:
        config = saved_batch_tokens(config, output_dir)  # the budget the plan chose when the run started
    started = time.perf_counter()
    try:
        run = setup_run(config, output_dir, dist)
        run.origins = dict(origins or {})
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)  # this run's peak, not an earlier one's in this process
        history, state, final = train_run(run, resume_from)
        metrics = write_outputs(run, history, state, final, time.perf_counter() - started)
    except torch.OutOfMemoryError:
        raise UserError("out of GPU memory", oom_advice(config)) from None
    except OSError as exc:  # a full disk while writing the model, logs or plot: say what is intact
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise write_failed(output_dir / CHECKPOINTS_DIR, output_dir, exc, "the run's outputs") from None
    except KeyboardInterrupt:
        saved = checkpoint_dirs(output_dir / CHECKPOINTS_DIR)
        if saved:
            print(f"stopped; `--resume` continues from {saved[-1]}", file=sys.stderr)
        raise
    return metrics, run


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
    pad_id = run.pad_id
    collate_fn = run.recipe.objective.collate
    plan = DataPlan(run.prepared.train, loop.batch_tokens, loop.seed, padded=run.padded, pad_id=pad_id,
                    rank=run.dist.rank, world=run.dist.world, collate_fn=collate_fn)
    eval_batches = pack(run.prepared.eval, loop.batch_tokens, padded=run.padded, pad_id=pad_id, collate_fn=collate_fn)
    return plan, share_batches(run.dist, eval_batches)


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
        state = load_checkpoint(resume_from, run.model, engine.optimizer, engine.scheduler, run.dist)
    if run.dist.is_main:
        save_config(out, run_record(config, run.origins))
        write_jsonl(run.prepared.eval_conversations, out / HELD_OUT_FILE)
    log = RunLog(out, steps, start_step=state.step, history=state.history, enabled=run.dist.is_main,
                 bar_metrics=run.recipe.objective.bar_metrics)
    for line in run.notices + [f"training: {steps} steps, peak lr {config.peak_lr():g}"
                               + (f", resumed at step {state.step} from {resume_from}" if resume_from else "")]:
        log.message(line)

    def save(s: TrainState) -> Path:
        return save_checkpoint(out / CHECKPOINTS_DIR, run.model, engine.optimizer, engine.scheduler, s,
                               loop.keep_checkpoints, run.dist)

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
    weights = full_state_dict(run.dist, run.model, run.dtype)  # sharded weights gathered on rank 0 (all ranks call)
    metrics = run_metrics(history, state, final, run.device, seconds)
    if not run.dist.is_main:
        return metrics
    notice = adapter_stop_notice(run.model, run.tokenizer, run.prepared.end_of_turn_ids, out)
    save_model(run.model, run.tokenizer, out, run.prepared.end_of_turn_ids,
               merge=run.recipe.params.merge if run.config.method.merge else None, state_dict=weights)
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
    base_record = next((r for r in evals if r["step"] == 0), {})
    for key in (k for k in final if k not in ("eval_loss", "eval_perplexity")):  # the objective's own metrics
        metrics[f"base_{key}"], metrics[f"final_{key}"] = base_record.get(key), final[key]
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
    conversations = [c for c in run.prepared.eval_conversations if c.kind in ("chat", "preference")]
    if not conversations:
        print("report: skipped (no held-out chat or preference samples; set --test-split or --eval-data)",
              file=sys.stderr)
        return
    run.model = None  # free the training copy before loading the saved one
    tuned = load_model(str(output_dir), device=run.device)
    report_after_training(tuned, load_tokenizer(str(output_dir)), conversations, output_dir,
                          run.config.model.model)
