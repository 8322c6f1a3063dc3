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

from tunesmith.config_file import OptionError, coerce
from tunesmith.errors import UserError
from tunesmith.methods import OBJECTIVES, PARAMETER_SETS, Recipe, recipe

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "qa", "prompt-completion", "text", "preference")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "paged-adamw-32bit")  # = train.optim.BNB_OPTIMIZERS + adamw
TEMPLATES = ("auto", "tokenizer", "llama3", "chatml", "alpaca", "zephyr", "plain")  # = data.templates.TEMPLATE_NAMES


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise an `OptionError` for option `name` unless `ok`."""
    if not ok:
        raise OptionError(name, f"invalid value for {name}: {value!r} (allowed: {allowed})")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a `UserError` unless `value` is one of `choices`."""
    check(value in choices, name, value, " | ".join(choices))


@dataclass
class DatasetSpec:
    """One dataset of a mix (a YAML `data:`/`datasets:` entry): where it is and what differs for it."""

    path: str
    format: str | None = None
    columns: str | None = None
    system: str | None = None
    share: float | None = None  # of the training mix; the datasets without one share the rest by size

    def __post_init__(self) -> None:
        check(isinstance(self.path, str) and bool(self.path), "data path", self.path, "a file or hub dataset id")
        check(self.format is None or self.format in FORMATS, "format", self.format, " | ".join(FORMATS))
        check(self.share is None or (isinstance(self.share, (int, float)) and 0 < self.share <= 1),
              f"share of {self.path}", self.share, "0 < share <= 1")


def dataset_specs(value: Any) -> list[DatasetSpec] | None:
    """--data / `data:` / `datasets:` -> specs: a path, a list of paths, or a list of mappings."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    check(bool(items), "data", value, "a file, or a list of files")
    known = [f.name for f in dataclasses.fields(DatasetSpec)]
    specs = []
    for n, item in enumerate(items, start=1):
        if isinstance(item, DatasetSpec):
            specs.append(item)
        elif isinstance(item, (str, Path)):
            specs.append(DatasetSpec(str(item)))
        elif isinstance(item, dict):
            unknown = sorted(set(item) - set(known))
            check(not unknown and "path" in item, f"data entry {n}", item, f"a mapping of {', '.join(known)} "
                  "(path required)")
            specs.append(DatasetSpec(**item))
        else:
            check(False, f"data entry {n}", item, "a file path, or a mapping with path: FILE")
    shares = [s.share for s in specs if s.share is not None]
    exact = len(shares) == len(specs)
    check(abs(sum(shares) - 1) < 1e-6 if exact else sum(shares) < 1, "share", shares,
          "shares that add up to 1 (to less than 1 when some datasets have none: they share the rest)")
    return specs


@dataclass
class DataOptions:
    """Where training data comes from and how it becomes tokens."""

    data: list[DatasetSpec] | None = None
    """Data file (.jsonl .json .csv .tsv .parquet .txt, optionally .gz/.zst) or hub dataset id; repeat --data to mix several; none: the bundled example."""
    format: str = "auto"
    """Sample format: auto | alpaca | sharegpt | messages | qa | prompt-completion | text | preference."""
    columns: str | None = None
    """Map your column names, e.g. prompt=question,response=answer,system=sys."""
    template: str = "auto"
    """Chat template: auto (the tokenizer's own, else a default) | llama3 | chatml | alpaca | zephyr | plain."""
    system: str | None = None
    """System prompt added to every sample that has none."""
    fold_system: bool = True
    """Where the chat template has no system role (Gemma 2, Mistral 7B), fold the system prompt into the first user turn; --no-fold-system refuses such samples instead."""
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
        self.data = dataset_specs(self.data)
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
    """The loss: sft (the replies and their end-of-turn token) | pretrain (every token: continued pretraining) | dpo (preference pairs, reference = the base) | orpo (preference pairs, no reference)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_targets: str = "all-linear"
    """Modules that get adapters: all-linear, or a comma list such as q_proj,v_proj."""
    merge: bool = False
    """Also write merged full weights after a LoRA run."""
    beta: float = 0.1
    """DPO: how far the tuned model may move from the reference (higher: stays closer); sigmoid loss."""
    orpo_lambda: float = 0.1
    """ORPO: weight of the odds-ratio term beside the NLL of the chosen reply."""
    reference: str = "cached"
    """DPO with --method full, where the reference log-probs come from: cached (one no-grad pass over the pairs before training, stored with the tokenized data and reused by reruns; no second model in memory) | live (a frozen copy of the starting weights scores each batch during training: one more copy of the weights in memory and one more no-grad forward per batch, every epoch; no pass before training, nothing cached). LoRA's reference is always the base with the adapter switched off."""

    def __post_init__(self) -> None:
        check_choice("method", self.method, tuple(PARAMETER_SETS))
        check_choice("objective", self.objective, tuple(OBJECTIVES))
        self.recipe()  # refuses impossible combinations now, before anything loads
        check(self.lora_r >= 1, "lora_r", self.lora_r, "an integer >= 1")
        check(self.lora_alpha >= 1, "lora_alpha", self.lora_alpha, "an integer >= 1")
        check(self.beta > 0, "beta", self.beta, "> 0")
        check(self.orpo_lambda >= 0, "orpo_lambda", self.orpo_lambda, ">= 0")

    def recipe(self) -> Recipe:
        """The parameter set x objective this run trains with."""
        return recipe(self.method, self.objective, merge=self.merge, reference=self.reference)


@dataclass
class LoopOptions:
    """How long and how hard to train."""

    epochs: float = 3.0
    """Passes over the training data (ignored when --max-steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    lr: float | None = None
    """Peak learning rate; default by objective and method (sft, pretrain: 1e-5 full, 2e-4 LoRA; dpo: 5e-7 full, 5e-6 LoRA; orpo: 1e-6 full, 1e-5 LoRA)."""
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
class DistributedOptions:
    """More than one GPU (torchrun): how many, and how the model is spread over them."""

    gpus: int = 1
    """GPUs (processes) on this machine: N > 1 relaunches under torchrun (ignored under torchrun)."""
    parallel: str = "auto"
    """Several GPUs: auto (ddp for adapters, fsdp for full) | ddp (replicate) | fsdp (shard per block)."""
    cpu_offload: bool = False
    """FSDP: keep sharded weights, gradients and optimizer state in CPU memory (bigger models, slower)."""

    def __post_init__(self) -> None:
        check(self.gpus >= 1, "gpus", self.gpus, "an integer >= 1")
        check_choice("parallel", self.parallel, ("auto", "ddp", "fsdp"))


@dataclass
class OutputOptions:
    """Where results go and what is produced at the end."""

    output: str = "tunesmith-output"
    """Output directory (loadable by transformers.pipeline)."""
    report: bool = True
    """Compare base and tuned model on held-out prompts at the end and write report.html."""
    export: str | None = None
    """At the end, also export the model: gguf | ollama | merged (as `tunesmith export OUTPUT --to ...`)."""

    def __post_init__(self) -> None:
        check(self.export in (None, "gguf", "ollama", "merged"), "export", self.export, "gguf | ollama | merged")


@dataclass
class TrainConfig:
    """Everything `tunesmith train` needs."""

    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    method: MethodOptions = field(default_factory=MethodOptions)
    loop: LoopOptions = field(default_factory=LoopOptions)
    distributed: DistributedOptions = field(default_factory=DistributedOptions)
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
    """One leaf option: its group attribute, flat name, type, default, help, and whether None is allowed."""

    group: str | None
    name: str
    type: type
    default: Any
    help: str
    optional: bool = False

    @property
    def negated(self) -> bool:
        """A boolean that is on by default: its flag turns it off."""
        return self.type is bool and self.default is True

    @property
    def flag(self) -> str:
        """The CLI flag; booleans that default to True are spelled `--no-NAME`."""
        base = self.name.replace("_", "-")
        return f"--no-{base}" if self.negated else f"--{base}"

    @property
    def flag_help(self) -> str:
        """The help line of the flag: what *the flag* does (a `--no-` flag turns the option off)."""
        if self.negated:
            return f"Do not {self.help[:1].lower()}{self.help[1:].rstrip('.')} (on by default)."
        return f"{self.help} (default: {self.default})"


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


def _leaf_type(annotation: Any) -> tuple[type, bool]:
    """`int | None` -> (int, True); `str` -> (str, False)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


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
        kind, optional = _leaf_type(hint)
        out.append(Option(group, f.name, kind, default, docs.get(f.name, ""), optional))
    return out


def build_config(cls: type, values: dict[str, Any], sources: dict[str, str] | None = None) -> Any:
    """Instantiate `cls` from a flat mapping of option names (unknown keys are refused).

    `sources` maps an option name to where its value was set (`run.yaml:3`, `--lr`); an
    invalid value is then reported there, so the user knows which line or flag to fix.
    """
    try:
        return _build(cls, values)
    except OptionError as exc:
        where = (sources or {}).get(exc.option)
        if where is None:
            raise
        raise OptionError(exc.option, f"{where}: {exc}", exc.problems) from None


def _build(cls: type, values: dict[str, Any]) -> Any:
    """`build_config` without the error locations."""
    from tunesmith.config_file import suggest

    options = {o.name: o for o in options_of(cls)}
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise UserError(f"unknown option(s): {', '.join(unknown)}",
                        [f"{name}: unknown{suggest(name, sorted(options))}" for name in unknown])
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sub = {o.name: values[o.name] for o in options_of(hint) if o.name in values}
            kwargs[f.name] = _build(hint, sub)
        elif f.name in values:
            kwargs[f.name] = coerce(options[f.name], values[f.name])
    return cls(**kwargs)


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
    if "datasets" in loaded:  # Axolotl's name for the list of datasets
        if "data" in loaded:
            raise UserError(f"{p}: both data and datasets are set; keep one (they are the same option)")
        loaded["data"] = loaded.pop("datasets")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def read_options_file(path: str | Path, cls: type) -> Any:
    """A `--config` file read against the options of `cls` (a `tunesmith.config_file.ConfigFile`)."""
    from tunesmith.config_file import read_config_file

    options = {o.name: o for o in options_of(cls)}
    known = {name: functools.partial(coerce, opt) for name, opt in options.items()}
    default_length = options["max_length"].default if "max_length" in options else 2048
    return read_config_file(path, known, max_length=default_length)


STARTER_DEFAULTS = Path(__file__).resolve().parent / "assets" / "starter" / "defaults.yaml"


def starter_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """The starter's defaults that apply beneath `values` (none when a model is named).

    The starter's `defaults.yaml` is tuned so the zero-argument job finishes in minutes on
    a laptop CPU. Its learning rate belongs to its method and objective, so it is dropped
    when the user picks another one (else `--method lora` would silently train at the
    starter's full fine-tuning rate); its `recipes:` mapping ("OBJECTIVE/METHOD": {option:
    value}) holds the starter's values for other pairs (e.g. a DPO rate that moves a 14M
    model within a minute). Keys the user gave are never in the result.
    """
    if values.get("model") is not None or not STARTER_DEFAULTS.is_file():
        return {}
    starter = load_yaml(STARTER_DEFAULTS)
    recipes = starter.pop("recipes", None) or {}
    chosen = {k: values.get(k, starter.get(k)) for k in ("method", "objective")}
    if any(chosen[k] != starter.get(k) for k in chosen):
        starter.pop("lr", None)
    starter.update(recipes.get(f"{chosen['objective']}/{chosen['method']}", {}))
    return {k: v for k, v in starter.items() if k not in values}


def train_config(values: dict[str, Any] | None = None, sources: dict[str, str] | None = None) -> TrainConfig:
    """A `TrainConfig` from flat option values (YAML and flags already merged, flags winning).

    With no model named, the bundled starter model is used and `starter_defaults` go
    beneath what the user gave: user values always win. `sources` locates bad values.
    """
    values = dict(values or {})
    return build_config(TrainConfig, {**starter_defaults(values), **values}, sources)


def to_flat_dict(config: Any) -> dict[str, Any]:
    """The resolved config as one flat mapping (what is saved as `config.yaml`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value))
        elif isinstance(value, list):  # the datasets of a mix: one mapping each, unset keys left out
            out[f.name] = [{k: v for k, v in dataclasses.asdict(item).items() if v is not None}
                           if dataclasses.is_dataclass(item) else item for item in value]
        else:
            out[f.name] = value
    return out


def run_record(config: Any, origins: dict[str, str]) -> dict[str, Any]:
    """What a run's config.yaml holds: the options with the values actually used, and where each came from.

    The lr left to the recipe is written as the rate that ran (not `null`), so
    `tunesmith train --config OUT/config.yaml` trains the same way even where the
    defaults have changed since; `sources` is read back as a record only.
    """
    out = to_flat_dict(config)
    out["lr"] = config.peak_lr()
    out["sources"] = dict(origins)
    return out
