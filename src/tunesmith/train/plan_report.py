"""`tunesmith plan`: what fits on a GPU, per method, from a model's config alone (no weights).

One row per parameter set of the registry, with and without gradient checkpointing: the
estimated peak at the reference token budget, whether it fits, and the largest token
budget per micro-batch that fits. Then the command line it recommends: the adapter
method of highest precision that fits a useful budget (LoRA before QLoRA), checkpointing
only when needed.
"""
from __future__ import annotations

from dataclasses import dataclass

from tunesmith.errors import UserError
from tunesmith.train import plan

REFERENCE_TOKENS = 8192  # the budget the "peak" column is shown at


@dataclass
class PlanOptions:
    """Options of `tunesmith plan`."""

    model: str | None = None
    """Hub id, local model directory, tunesmith output directory or a config.json file (only the config is read)."""
    gpu_memory: str | None = None
    """GPU memory to plan for, e.g. 24GB or 80GB (default: this machine's GPU, else 24GB)."""
    data: str | None = None
    """Your training data: its longest sample sets the smallest useful budget (reads the tokenizer, not weights)."""
    optim: str = "adamw"
    """Optimizer to plan for: adamw | adamw-8bit | paged-adamw-8bit | paged-adamw-32bit."""
    lora_r: int = 16
    """LoRA rank to plan for."""

    def __post_init__(self) -> None:
        from tunesmith.config import OPTIMIZERS, check, check_choice

        check_choice("optim", self.optim, OPTIMIZERS)
        check(self.lora_r >= 1, "lora_r", self.lora_r, "an integer >= 1")


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    method: str
    checkpointing: bool
    peak: float
    fits: bool
    max_tokens: int


def gpu_memory(text: str | None) -> tuple[float, str]:
    """Bytes to plan for and where the figure came from."""
    if text:
        return plan.parse_memory(text), "given"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return float(props.total_memory), props.name
    return 24.0 * plan.GIB, "default; pass --gpu-memory"


def table(shape: plan.ModelShape, memory: float, optim: str, lora_r: int) -> list[Row]:
    """Every parameter set of the registry, without and with checkpointing (bf16 on CUDA, fast path)."""
    from tunesmith.methods import PARAMETER_SETS

    rows = []
    for params in PARAMETER_SETS.values():
        for ckpt in (False, True):
            s = plan.Setting(adapter=params.adapter, base_bits=params.base_bits, checkpointing=ckpt, optim=optim,
                             lora_r=lora_r)
            e = plan.estimate(shape, s, REFERENCE_TOKENS)
            rows.append(Row(params.name, ckpt, e.total, plan.fits(e, memory), plan.max_tokens(shape, s, memory)))
    return rows


def recommend(rows: list[Row], model: str, optim: str, smallest: int) -> str:
    """The command line of the adapter row to train with on this card.

    First choice: no checkpointing (fastest) at a budget of at least AUTO_MIN_TOKENS, the
    highest-precision method first (LoRA before QLoRA). Else, with checkpointing, the
    method that fits the most tokens. Full fine-tuning is shown but not recommended (the
    default method is LoRA); pass --method full when the table says it fits.
    """
    from tunesmith.methods import PARAMETER_SETS

    def usable(row: Row) -> int:
        return min(row.max_tokens, plan.AUTO_MAX_TOKENS)

    adapters = [r for r in rows if PARAMETER_SETS[r.method].adapter and usable(r) >= max(smallest, 2 * plan.TOKEN_STEP)]
    fast = [r for r in adapters if not r.checkpointing and usable(r) >= plan.AUTO_MIN_TOKENS]
    fast.sort(key=lambda r: -PARAMETER_SETS[r.method].base_bits)
    slow = sorted((r for r in adapters if r.checkpointing),
                  key=lambda r: (-usable(r), -PARAMETER_SETS[r.method].base_bits))
    for row in fast + slow:
        flags = [f"--method {row.method}", f"--batch-tokens {usable(row)}"]
        flags += ["--gradient-checkpointing"] if row.checkpointing else []
        flags += [f"--optim {optim}"] if optim != "adamw" else []
        return f"tunesmith train{f' --model {model}' if model else ''} {' '.join(flags)} --data YOUR_DATA"
    return "nothing fits: try --optim paged-adamw-8bit, a smaller model, or a GPU with more memory"


def longest_sample(data: str, model: str) -> tuple[int, int, int]:
    """(samples, tokens, longest sample) of a data file, tokenized with the model's tokenizer."""
    from tunesmith.config import DataOptions
    from tunesmith.data.prepare import prepare_data
    from tunesmith.model.load import load_tokenizer

    tokenizer = load_tokenizer(model)
    prepared = prepare_data(DataOptions(data=data, test_split=0.0), tokenizer, seed=0, cache_dir=None,
                            log=lambda line: None)
    lengths = [len(s.input_ids) for s in prepared.train]
    return len(lengths), sum(lengths), max(lengths, default=0)


def format_plan(shape: plan.ModelShape, memory: float, source: str, rows: list[Row], optim: str) -> list[str]:
    """The printed table."""
    lines = [f"{shape.name}: {shape.parameters / 1e9:.2f}B parameters ({shape.layers} layers, hidden {shape.hidden}, "
             f"vocab {shape.vocab:,}); GPU memory {memory / plan.GIB:.1f} GiB ({source}); optimizer {optim}",
             f"{'method':<8}{'checkpointing':<15}{f'peak @ {REFERENCE_TOKENS} tokens':>22}{'fits':>6}"
             f"{'largest budget':>16}"]
    for r in rows:
        lines.append(f"{r.method:<8}{'on' if r.checkpointing else 'off':<15}{r.peak / plan.GIB:>18.1f} GiB"
                     f"{'yes' if r.fits else 'no':>6}{(f'{r.max_tokens:,}' if r.max_tokens else '-'):>16}")
    lines.append(f"(bf16 on CUDA with the fast path; peak includes the CUDA context; fits = under "
                 f"{plan.HEADROOM:.0%} of the card)")
    return lines


def run_plan(options: PlanOptions) -> list[str]:
    """The lines `tunesmith plan` prints."""
    from tunesmith.model.load import STARTER_DIR

    model = options.model or str(STARTER_DIR)
    raw, name = plan.read_config(model)
    shape = plan.shape_from_config(raw, name)
    memory, source = gpu_memory(options.gpu_memory)
    rows = table(shape, memory, options.optim, options.lora_r)
    lines = format_plan(shape, memory, source, rows, options.optim)
    smallest = 0
    if options.data:
        if options.model is not None and not _has_tokenizer(options.model):
            raise UserError(f"--data: {options.model} holds no tokenizer to count tokens with",
                            ["fix: pass the model directory or hub id, not its config.json"])
        count, tokens, smallest = longest_sample(options.data, model)
        lines.append(f"data: {count:,} samples, {tokens:,} tokens, longest {smallest:,} "
                     "(a budget below the longest sample packs it alone)")
    shown = options.model if options.model and _has_tokenizer(options.model) else "MODEL"  # a config file cannot train
    lines.append("recommended: " + recommend(rows, shown if options.model else "", options.optim, smallest))
    return lines


def _has_tokenizer(model: str) -> bool:
    """False for a bare config.json file (the other forms of --model name a tokenizer)."""
    from pathlib import Path

    return not Path(model).expanduser().is_file()

