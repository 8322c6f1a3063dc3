"""Reading a `--config run.yaml`: every problem named by FILE:LINE and key, with a way out.

Users bring configs written for other tools, and YAML 1.1 has traps (`lr: 1e-4` is a
string, `system: no` is a boolean). So a file is read key by key: each key must be one
of the options of the command's config class, or a name another tool uses for the same
thing (`learning_rate` -> `lr`; each such mapping is said, never silent); names with no
honest equivalent are refused with what to write instead; anything else is an unknown
key with a "did you mean". Values are coerced to the option's type (`tunesmith.config.coerce`).
All problems of a file are reported at once.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError


class OptionError(UserError):
    """A bad value of one option; `option` names it, so the caller can say where it was set."""

    def __init__(self, option: str, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message, problems)
        self.option = option


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(opt: Any, value: Any) -> Any:
    """Convert a YAML or API value to the type of `opt` (a `tunesmith.config.Option`); an `OptionError` says what was expected.

    Numeric strings are numbers (YAML 1.1 reads `1e-4` as a string); `null` is only for
    options that may be unset; a list or mapping is never squeezed into one value.
    """
    kind, name = opt.type, opt.name
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(kind)
    if expected is None:  # a structured option (a list, ...): its own __post_init__ validates it
        return value
    if value is None:
        if opt.optional:
            return None
        raise OptionError(name, f"{name}: null is not allowed (expected {expected}; delete the key for the "
                                f"default, {opt.default!r})")
    if isinstance(value, (list, tuple, dict, set)):
        what = "a mapping" if isinstance(value, dict) else "a list"
        raise OptionError(name, f"{name}: expected one value ({expected}), got {what}: {value!r}")
    converted = _convert_scalar(kind, value)
    if converted is None:
        hint = "; YAML read it as a boolean: quote it" if isinstance(value, bool) and kind is str else ""
        raise OptionError(name, f"invalid value for {name}: {value!r} (expected {expected}{hint})")
    return converted


def _convert_scalar(kind: type, value: Any) -> Any:
    """`value` as `kind`, or None when it is not one (booleans are never numbers)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None
    if isinstance(value, bool):
        return None
    if kind is str:
        return str(value) if isinstance(value, (str, int, float)) else None
    number: Any = value
    if isinstance(value, str):
        try:
            number = float(value.strip().replace("_", ""))
        except ValueError:
            return None
    if not isinstance(number, (int, float)) or number != number:  # NaN is no setting
        return None
    if kind is float:
        return float(number)
    return int(number) if float(number).is_integer() else None


@dataclass(frozen=True)
class Alias:
    """Another tool's name for an option: `target` (None: no equivalent, `note` says what to do)."""

    target: str | None
    note: str
    convert: Callable[[Any], Any] | None = None


def _join_list(value: Any) -> Any:
    """A YAML list of module names -> our comma list."""
    return ",".join(str(v) for v in value) if isinstance(value, list) else value


HF = "the Hugging Face TrainingArguments name"
ALIASES: dict[str, Alias] = {
    "learning_rate": Alias("lr", HF),
    "num_train_epochs": Alias("epochs", HF),
    "num_epochs": Alias("epochs", "the Axolotl name"),
    "gradient_accumulation_steps": Alias("grad_accum", HF),
    "output_dir": Alias("output", HF),
    "max_grad_norm": Alias("grad_clip", HF),
    "eval_steps": Alias("eval_every", HF),
    "save_steps": Alias("save_every", HF),
    "save_total_limit": Alias("keep_checkpoints", HF),
    "model_name_or_path": Alias("model", "the Hugging Face / LLaMA-Factory name"),
    "base_model": Alias("model", "the Axolotl name"),
    "max_seq_length": Alias("max_length", "the TRL name"),
    "sequence_len": Alias("max_length", "the Axolotl name"),
    "cutoff_len": Alias("max_length", "the LLaMA-Factory name"),
    "lora_rank": Alias("lora_r", "the LLaMA-Factory name"),
    "lora_target_modules": Alias("lora_targets", "the Axolotl name", _join_list),
    "target_modules": Alias("lora_targets", "the peft name", _join_list),
    "lora_target": Alias("lora_targets", "the LLaMA-Factory name", _join_list),
    "chat_template": Alias("template", "the Axolotl name"),
    "system_prompt": Alias("system", "a common name"),
    "finetuning_type": Alias("method", "the LLaMA-Factory name"),
    "warmup_steps": Alias(None, "tunesmith warms up over a share of the steps: use warmup_ratio (e.g. 0.03)"),
    "bf16": Alias(None, "tunesmith picks the dtype (bf16 on CUDA where supported, else float32): delete it"),
    "fp16": Alias(None, "tunesmith picks the dtype (bf16 on CUDA where supported, else float32): delete it"),
    "lr_scheduler_type": Alias(None, "the schedule is cosine with --warmup-ratio: delete it"),
    "logging_steps": Alias(None, "every optimizer step is logged to metrics.jsonl: delete it"),
}
# Batch sizes in samples have no exact token equivalent: the message computes the honest bound.
SAMPLE_BATCH_NAMES = ("per_device_train_batch_size", "micro_batch_size", "train_batch_size", "batch_size")
# Sentinels other tools use for "unset".
UNSET_SENTINELS: dict[str, Any] = {"max_steps": -1}


def suggest(name: str, known: list[str]) -> str:
    """` (did you mean X?)` for the closest known option or alias, or a pointer to the list."""
    alias = ALIASES.get(name)
    if alias is not None and alias.target in known:
        return f" (did you mean {alias.target}?)"
    close = difflib.get_close_matches(name, known + [a for a, v in ALIASES.items() if v.target in known], n=1)
    if close:
        target = ALIASES[close[0]].target if close[0] in ALIASES else close[0]
        return f" (did you mean {target}?)"
    return " (run with --help for the options)"


@dataclass
class ConfigFile:
    """A config file read against one config class: values by option name, where each came from."""

    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)  # option name -> line of its key
    notices: list[str] = field(default_factory=list)  # aliases mapped, sentinels read as unset

    def where(self, name: str) -> str:
        """`FILE:LINE` of an option's key."""
        return f"{self.path}:{self.lines[name]}" if name in self.lines else str(self.path)


def _mapping_with_lines(path: Path) -> tuple[dict[str, Any], dict[str, int], list[str]]:
    """The YAML mapping, the line of each key, and problems (duplicate keys, not a mapping)."""
    import yaml

    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}, {}, []
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise UserError(f"{path}:1: expected a mapping of option: value (one per line, e.g. `lr: 1e-4`)")
    lines: dict[str, int] = {}
    problems: list[str] = []
    for key_node, _ in node.value:
        key = str(key_node.value)
        line = key_node.start_mark.line + 1
        if key in lines:
            problems.append(f"{path}:{line}: {key}: given twice (also on line {lines[key]}); keep one")
        lines.setdefault(key, line)
    return {str(k): v for k, v in data.items()}, lines, problems


RECORD_ONLY_KEYS = ("sources",)  # written into config.yaml by a run, not options


def read_config_file(path: str | Path, known: dict[str, Callable[[Any], Any]],
                     max_length: int = 2048) -> ConfigFile:
    """Read `path` against the options in `known` (name -> coercer raising UserError); all problems at once.

    `max_length` is the default used to convert a batch size in samples into tokens in the
    refusal message, when the file does not set max_length itself.
    """
    p = Path(path).expanduser()
    raw, raw_lines, problems = _mapping_with_lines(p)
    out = ConfigFile(p)
    names = sorted(known)
    for key, value in raw.items():
        line = raw_lines.get(key, 1)
        name = key.strip().replace("-", "_").lower()
        where = f"{p}:{line}"
        if name in RECORD_ONLY_KEYS and name not in known:
            continue  # a run's config.yaml records where its settings came from; a rerun records its own
        if name not in known and name in ALIASES and ALIASES[name].target in known:
            alias = ALIASES[name]
            out.notices.append(f"{where}: {key} read as {alias.target} ({alias.note})")
            value = alias.convert(value) if alias.convert else value
            name = alias.target  # type: ignore[assignment]
        elif name not in known and name in ALIASES:
            problems.append(f"{where}: {key}: not a tunesmith option ({ALIASES[name].note})")
            continue
        elif name not in known and name in SAMPLE_BATCH_NAMES and "batch_tokens" in known:
            length = raw.get("max_length", raw.get("max_seq_length"))
            length = length if isinstance(length, int) and not isinstance(length, bool) else max_length
            tokens = value * length if isinstance(value, int) else f"N x {length}"
            problems.append(f"{where}: {key}: tunesmith batches by tokens, not samples: write "
                            f"`batch_tokens: {tokens}` ({value} samples of up to {length} tokens; "
                            "shorter samples are packed, so more fit)")
            continue
        elif name not in known:
            problems.append(f"{where}: {key}: unknown option{suggest(name, names)}")
            continue
        if name in out.values:
            problems.append(f"{where}: {key}: sets {name} again (line {out.lines[name]}); keep one")
            continue
        if name in UNSET_SENTINELS and value == UNSET_SENTINELS[name]:
            out.notices.append(f"{where}: {key}: {value} read as unset (the Hugging Face 'no limit')")
            value = None
        try:
            out.values[name] = known[name](value)
        except UserError as exc:
            problems.append(f"{where}: {exc}" if key == name else f"{where}: {key}: {exc}")
            continue
        out.lines[name] = line
    if problems:
        raise UserError(f"{p}: {len(problems)} problem(s) in the config file", problems)
    return out


# --------------------------------------------------------------------------------------
# Where each resolved setting came from (printed at the start of `train`).


def _origin(name: str, sources: dict[str, str], starter: set[str]) -> str:
    """`flag --lr`, `config run.yaml:3`, `starter default` or `default`."""
    if name in sources:
        where = sources[name]
        return f"flag {where}" if where.startswith("-") else f"config {where}"
    return "starter default" if name in starter else "default"


KEY_SETTINGS = ("model", "method", "objective", "lr", "epochs", "max_steps", "batch_tokens")


def setting_origins(config: Any, sources: dict[str, str], starter: set[str]) -> dict[str, str]:
    """Where each setting of a `TrainConfig` came from: the key settings always, others when not a default.

    `sources` maps an option to its flag or `FILE:LINE`; `starter` holds the options the
    bundled starter's defaults supplied. An option that differs from its default with
    neither is "given" (set by a Python caller). An unset lr comes from the recipe
    (method x objective) and an unset batch_tokens from the memory plan, and say so.
    """
    from tunesmith.config import options_of, to_flat_dict

    values = to_flat_dict(config)
    out: dict[str, str] = {}
    for opt in options_of(type(config)):
        origin = _origin(opt.name, sources, starter)
        if origin == "default" and values.get(opt.name) != opt.default:
            origin = "given"
        if opt.name in KEY_SETTINGS or origin != "default":
            out[opt.name] = origin
    if config.loop.lr is None:
        out["lr"] = f"default for {config.method.method} x {config.method.objective}"
    if config.loop.batch_tokens is None:
        out["batch_tokens"] = "default: the memory plan picks it on CUDA, 8192 on CPU"
    return out


def describe_settings(config: Any, sources: dict[str, str], starter: set[str]) -> str:
    """The key settings of a `TrainConfig` and where each came from: a flag, the config file, a default.

    The same origins are recorded in the run's config.yaml (`sources:`), so what was
    printed at the start can be read again after the run.
    """
    origins = setting_origins(config, sources, starter)
    length = (("max_steps", config.loop.max_steps) if config.loop.max_steps is not None
              else ("epochs", f"{config.loop.epochs:g}"))
    rows = [
        ("model", config.model.model or "the bundled starter", origins["model"]),
        ("method", config.method.method, origins["method"]),
        ("objective", config.method.objective, origins["objective"]),
        ("lr", f"{config.peak_lr():g}", origins["lr"]),
        (length[0], length[1], origins[length[0]]),
        ("batch_tokens", config.loop.batch_tokens if config.loop.batch_tokens is not None else "auto",
         origins["batch_tokens"]),
    ]
    width = max(len(str(r[1])) for r in rows)
    return "settings:\n" + "\n".join(f"  {name:13s} {str(value):{width}s}  ({origin})" for name, value, origin in rows)
