"""Run configuration: typed dataclasses are the one source of truth.

Each option is a dataclass field whose attribute docstring is its help text. The CLI
flags, the YAML keys and `--help` are all derived from these classes, so an option
cannot exist in one place and be missing from another. Precedence: defaults < YAML
file (`--config run.yaml`) < flags. Validation lives in `__post_init__` and raises
`UserError` naming the field, the bad value and what is allowed.

Option groups compose (`TrainConfig` holds a `DataOptions`, a `ModelOptions`, ...) but
names are flat and unique across groups, so a YAML file is one flat mapping.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError
from tunesmith.methods import OBJECTIVES, PARAMETER_SETS, Recipe, recipe

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "qa", "prompt-completion", "text", "preference")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "paged-adamw-32bit")  # = train.optim.BNB_OPTIMIZERS + adamw
TEMPLATES = ("auto", "tokenizer", "llama3", "chatml", "alpaca", "zephyr", "plain")  # = data.templates.TEMPLATE_NAMES


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a `UserError` for option `name` unless `ok`."""
    if not ok:
        raise UserError(f"invalid value for {name}: {value!r} (allowed: {allowed})")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a `UserError` unless `value` is one of `choices`."""
    check(value in choices, name, value, " | ".join(choices))


@dataclass
class DataOptions:
    """Where training data comes from and how it becomes tokens."""

    data: str | None = None
    """Data file (.jsonl .json .csv .tsv .parquet .txt) or hub dataset id; none: the bundled example."""
    format: str = "auto"
    """Sample format: auto | alpaca | sharegpt | messages | qa | prompt-completion | text | preference."""
    columns: str | None = None
    """Map your column names, e.g. prompt=question,response=answer,system=sys."""
    template: str = "auto"
    """Chat template: auto (the tokenizer's own, else a default) | llama3 | chatml | alpaca | zephyr | plain."""
    system: str | None = None
    """System prompt added to every sample that has none."""
    max_length: int = 2048
    """Longest sample in tokens; longer ones are truncated (and counted)."""
    train_on_prompt: bool = False
    """Train on every token, not only the assistant replies."""
    skip_invalid: bool = False
    """Skip invalid rows (counted and reported) instead of stopping."""
    test_split: float = 0.05
    """Share of samples held out for evaluation (0 disables)."""
    eval_data: str | None = None
    """A separate evaluation file instead of --test-split."""

    def __post_init__(self) -> None:
        check_choice("format", self.format, FORMATS)
        check_choice("template", self.template, TEMPLATES)
        check(self.max_length >= 16, "max_length", self.max_length, "an integer >= 16")
        check(0.0 <= self.test_split < 1.0, "test_split", self.test_split, "0 <= x < 1")


@dataclass
class ModelOptions:
    """Which model to start from."""

    model: str | None = None
    """Hub id, local directory or tunesmith output directory; none: the bundled starter model."""
    trust_remote_code: bool = False
    """Allow a hub model to run its own Python code (off unless you trust it)."""


@dataclass
class MethodOptions:
    """What trains (`method`) and what the loss is (`objective`): one entry of each registry."""

    method: str = "lora"
    """What trains: full (every weight) | lora (an adapter; the base stays frozen) | qlora (an adapter on 4-bit NF4 base weights)."""
    objective: str = "sft"
    """The loss: sft (the replies and their end-of-turn token) | pretrain (every token: continued pretraining)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_targets: str = "all-linear"
    """Modules that get adapters: all-linear, or a comma list such as q_proj,v_proj."""
    merge: bool = False
    """Also write merged full weights after a LoRA run."""

    def __post_init__(self) -> None:
        check_choice("method", self.method, tuple(PARAMETER_SETS))
        check_choice("objective", self.objective, tuple(OBJECTIVES))
        self.recipe()  # refuses impossible combinations now, before anything loads
        check(self.lora_r >= 1, "lora_r", self.lora_r, "an integer >= 1")
        check(self.lora_alpha >= 1, "lora_alpha", self.lora_alpha, "an integer >= 1")

    def recipe(self) -> Recipe:
        """The parameter set x objective this run trains with."""
        return recipe(self.method, self.objective, merge=self.merge)


@dataclass
class LoopOptions:
    """How long and how hard to train."""

    epochs: float = 3.0
    """Passes over the training data (ignored when --max-steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    lr: float | None = None
    """Peak learning rate; default by objective and method (sft and pretrain: 1e-5 full, 2e-4 LoRA)."""
    warmup_ratio: float = 0.0
    """Share of steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optim: str = "adamw"
    """adamw (fused; bf16 weights with stochastic rounding) | adamw-8bit | paged-adamw-8bit | paged-adamw-32bit (bitsandbytes: 8-bit states, paged to CPU under memory pressure)."""
    batch_tokens: int | None = None
    """Real tokens per micro-batch; samples are packed end to end up to this budget. Default: on CUDA the largest that fits (up to 16384, `tunesmith plan`), else 8192."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (on CUDA also on by itself when the memory plan needs it)."""
    fast_kernels: bool = True
    """Use fused kernels and flex attention on CUDA where they apply."""
    eval_every: int = 0
    """Evaluate held-out loss every N steps (0: only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: none; the final model is always saved)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in --output."""
    seed: int = 42
    """Random seed for data order, initialisation and dropout."""

    def __post_init__(self) -> None:
        check(self.epochs > 0, "epochs", self.epochs, "> 0")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1")
        check(self.lr is None or 0 < self.lr < 1, "lr", self.lr, "0 < lr < 1")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", self.warmup_ratio, "0 <= x < 1")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check_choice("optim", self.optim, OPTIMIZERS)
        check(self.batch_tokens is None or self.batch_tokens >= 16, "batch_tokens", self.batch_tokens, "an integer >= 16")
        check(self.grad_accum >= 1, "grad_accum", self.grad_accum, "an integer >= 1")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0")
        check(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")
        check(self.save_every >= 0, "save_every", self.save_every, ">= 0")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, ">= 1")


@dataclass
class OutputOptions:
    """Where results go and what is produced at the end."""

    output: str = "tunesmith-output"
    """Output directory (loadable by transformers.pipeline)."""
    report: bool = True
    """Compare base and tuned model on held-out prompts at the end and write report.html."""


@dataclass
class TrainConfig:
    """Everything `tunesmith train` needs."""

    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    method: MethodOptions = field(default_factory=MethodOptions)
    loop: LoopOptions = field(default_factory=LoopOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    def peak_lr(self) -> float:
        """The learning rate to use: the flag, else the recipe's default for this method x objective."""
        if self.loop.lr is not None:
            return self.loop.lr
        return self.method.recipe().default_lr()


# --------------------------------------------------------------------------------------
# Deriving flags and YAML keys from the dataclasses.


@dataclass(frozen=True)
class Option:
    """One leaf option: its group attribute, flat name, type, default and help."""

    group: str | None
    name: str
    type: type
    default: Any
    help: str

    @property
    def flag(self) -> str:
        """The CLI flag; booleans that default to True are spelled `--no-NAME`."""
        base = self.name.replace("_", "-")
        return f"--no-{base}" if self.type is bool and self.default is True else f"--{base}"


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _leaf_type(annotation: Any) -> type:
    """`int | None` -> int; `str` -> str."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def options_of(cls: type, group: str | None = None) -> list[Option]:
    """All leaf options of a (possibly nested) config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.extend(options_of(hint, f.name))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(Option(group, f.name, _leaf_type(hint), default, docs.get(f.name, "")))
    return out


def build_config(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate `cls` from a flat mapping of option names (unknown keys are refused)."""
    known = {o.name for o in options_of(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sub = {o.name: values[o.name] for o in options_of(hint) if o.name in values}
            kwargs[f.name] = build_config(hint, sub)
        elif f.name in values:
            kwargs[f.name] = _coerce(f.name, values[f.name], _leaf_type(hint))
    return cls(**kwargs)


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Convert a YAML value to the option's type, with a clear error when it cannot be."""
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"invalid value for {name}: {value!r} (allowed: true | false)")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str:
        return str(value)
    raise UserError(f"invalid value for {name}: {value!r} (expected {kind.__name__})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML mapping of option names (dashes or underscores) to values."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{p}:1: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


STARTER_DEFAULTS = Path(__file__).resolve().parent / "assets" / "starter" / "defaults.yaml"


def train_config(values: dict[str, Any] | None = None) -> TrainConfig:
    """A `TrainConfig` from flat option values (YAML and flags already merged, flags winning).

    When no model is named, the run uses the bundled starter model, and the starter's own
    `defaults.yaml` (tuned so the zero-argument job finishes in minutes on a laptop CPU)
    goes beneath what the user gave: user values still win. Its learning rate belongs to
    its method and objective, so it is dropped when the user picks another one (else
    `--method lora` would silently train at the starter's full fine-tuning rate).
    """
    values = dict(values or {})
    if values.get("model") is None and STARTER_DEFAULTS.is_file():
        starter = load_yaml(STARTER_DEFAULTS)
        if any(values.get(k, starter.get(k)) != starter.get(k) for k in ("method", "objective")):
            starter.pop("lr", None)
        values = {**starter, **values}
    return build_config(TrainConfig, values)


def to_flat_dict(config: Any) -> dict[str, Any]:
    """The resolved config as one flat mapping (what is saved as `config.yaml`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value))
        else:
            out[f.name] = value
    return out
