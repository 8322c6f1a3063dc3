"""`tunesmith.evaluate` and the base-vs-tuned comparison that training runs at its end.

Both return the same dict:
    {"model": {metric: value}, "base": {...} (with a comparison), "difference": {...} (model - base),
     "reference": {...} (reply statistics of the references), "skipped": {metric: why},
     "samples": {"loss": n, "prompts": n}, "examples": [{"source", "prompt", "reference", "reply",
     "base_reply"}], "report": {"html": path, "md": path} or None}
and can write `report.md` + a self-contained `report.html` (see `tunesmith.eval.html`).
"""
from __future__ import annotations

import contextlib
import gc
import sys
from pathlib import Path
from typing import Any

from tunesmith.config import build_config
from tunesmith.data.conversation import Conversation
from tunesmith.errors import UserError
from tunesmith.eval.data import EvalCase, default_data, eval_cases, read_eval_data
from tunesmith.eval.options import COMPARE_BASE, EvalOptions
from tunesmith.eval.table import metric_rows, render_markdown, row_cells, skipped_lines, table_header
from tunesmith.train.files import CONFIG_FILE

TRAIN_MAX_NEW_TOKENS = 128


def evaluate(model: str | None = None, data: str | None = None, compare: str | None = None,
             **options: Any) -> dict[str, Any]:
    """Evaluate `model` on `data` (default: its held-out split); with `compare`, a base model too.

    `options` are the other `EvalOptions` fields (format, columns, report, max_prompts,
    max_new_tokens). A report is written when `report` is given, or to report.html with `compare`.
    """
    opts: EvalOptions = build_config(EvalOptions, {"data": data, "compare": compare, **options})
    source = opts.data or default_data(model)
    convs = read_eval_data(source, opts.format, opts.columns)
    tokenizer = _chat_tokenizer(load_tokenizer(model), convs)
    cases = eval_cases(convs, opts.max_prompts)
    tuned = _score_by_name(model, tokenizer, convs, cases, opts.max_new_tokens)
    base, names = None, (short_name(model), None)
    if opts.compare:
        base_name = base_model_name(model, opts.compare)
        base_tokenizer = load_tokenizer(base_name)
        # Same vocabulary: prompt both models with the template the tuned model learned.
        same = base_tokenizer.get_vocab() == tokenizer.get_vocab()
        base_tokenizer = tokenizer if same else _chat_tokenizer(base_tokenizer, convs)
        base = _score_by_name(base_name, base_tokenizer, convs, cases, opts.max_new_tokens)
        names = (names[0], short_name(base_name))
    result = assemble(tuned, base, cases, tokenizer)
    result["data"] = source
    report = opts.report or ("report.html" if opts.compare else None)
    if report:
        result["report"] = write_reports(result, Path(report), find_loss_curve(model), names)
    return result


def compare_models(base_model: Any, tuned_model: Any, tokenizer: Any, conversations: list[Conversation],
                   out_dir: Path, max_prompts: int = 20, loss_curve: Path | None = None) -> dict[str, Any]:
    """The end-of-training comparison: score both models, write report.md + report.html into `out_dir`.

    `tokenizer` must carry the chat template training used (training installs it). For a
    LoRA run pass the same PEFT model twice: the base is then scored with the adapter
    switched off, so no second copy of the weights is loaded.
    """
    from tunesmith.eval.preference import preference_pairs
    from tunesmith.eval.run import loss_samples, score_model

    samples = loss_samples(conversations, tokenizer)
    pairs = preference_pairs(conversations, tokenizer)
    cases = eval_cases(conversations, max_prompts)
    same_peft = base_model is tuned_model and hasattr(tuned_model, "disable_adapter")
    with tuned_model.disable_adapter() if same_peft else contextlib.nullcontext():
        base = score_model(base_model, tokenizer, samples, cases, TRAIN_MAX_NEW_TOKENS, pairs)
    tuned = score_model(tuned_model, tokenizer, samples, cases, TRAIN_MAX_NEW_TOKENS, pairs)
    result = assemble(tuned, base, cases, tokenizer)
    result["report"] = write_reports(result, Path(out_dir) / "report.html", loss_curve, ("tuned", "base"))
    return result


def report_after_training(tuned_model: Any, tokenizer: Any, conversations: list[Conversation], out_dir: Path,
                          base_name: str | None, max_prompts: int = 20) -> dict[str, Any]:
    """What `train` calls at its end: compare with the base, write the reports, print the table.

    A PEFT (LoRA) model is its own base with the adapter off; after a full fine-tune the base
    named `base_name` (None: the starter) is loaded beside it, on the same device and dtype.
    """
    from tunesmith.model.load import load_model

    out_dir = Path(out_dir)
    is_peft = hasattr(tuned_model, "disable_adapter")
    base = tuned_model if is_peft else load_model(base_name, device=tuned_model.device, dtype=tuned_model.dtype)
    result = compare_models(base, tuned_model, tokenizer, conversations, out_dir, max_prompts, out_dir / "loss.png")
    del base
    gc.collect()
    print(summary_text(result, ("tuned", "base")), file=sys.stderr)
    print(f"report: {result['report']['html']}", file=sys.stderr)
    return result


def assemble(tuned: Any, base: Any | None, cases: list[EvalCase], tokenizer: Any) -> dict[str, Any]:
    """The result dict (see the module docstring) from one or two `ModelResult`s."""
    from tunesmith.eval.run import reference_stats

    result: dict[str, Any] = {"model": dict(tuned.metrics), "reference": reference_stats(tokenizer, cases),
                              "skipped": dict(tuned.skipped), "report": None,
                              "samples": {"loss": tuned.loss_samples, "prompts": len(cases)}}
    examples = [{"source": c.source, "prompt": c.prompt, "reference": c.reference, "reply": reply}
                for c, reply in zip(cases, tuned.replies)]
    if base is not None and tuned.pair_logps is not None and base.pair_logps is not None:
        from tunesmith.eval.preference import reward_metrics

        result["model"].update(reward_metrics(tuned.pair_logps, base.pair_logps))
    if base is not None:
        result["base"] = dict(base.metrics)
        result["difference"] = {k: v - base.metrics[k] for k, v in tuned.metrics.items() if k in base.metrics}
        for example, reply in zip(examples, base.replies):
            example["base_reply"] = reply
    result["examples"] = examples
    return result


def write_reports(result: dict[str, Any], html_path: Path, loss_curve: Path | None,
                  names: tuple[str, str | None]) -> dict[str, str]:
    """Write the HTML report at `html_path` and the Markdown one beside it; return both paths."""
    from tunesmith.eval.html import render_html

    html_path.parent.mkdir(parents=True, exist_ok=True)
    md_path = html_path.with_suffix(".md")
    curve = loss_curve if loss_curve is not None and Path(loss_curve).is_file() else None
    html_path.write_text(render_html(result, names, curve), encoding="utf-8")
    md_path.write_text(render_markdown(result, names, curve, md_path.parent), encoding="utf-8")
    return {"html": str(html_path), "md": str(md_path)}


def base_model_name(model: str | None, compare: str) -> str | None:
    """What --compare names; 'base' is the model MODEL was fine-tuned from (adapter or config.yaml)."""
    if compare != COMPARE_BASE:
        return compare
    from tunesmith.model.load import adapter_base, resolve_model_name

    resolved = resolve_model_name(model)
    base = adapter_base(resolved)
    if base is not None:
        return base
    config = Path(resolved) / CONFIG_FILE
    if config.is_file():
        import yaml

        return (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("model")  # None: the starter
    raise UserError(f"--compare base: {model} is not a tunesmith output directory (no adapter_config.json "
                    "or config.yaml naming its base); pass the base model itself: --compare NAME")


def find_loss_curve(model: str | None) -> Path | None:
    """The loss-curve PNG training left in an output directory, if any."""
    if model is None or not Path(model).is_dir():
        return None
    found = sorted(Path(model).glob("*loss*.png"))
    return found[0] if found else None


def load_tokenizer(name: str | None) -> Any:
    """The model's tokenizer (an adapter directory's own copy, else its base's)."""
    from tunesmith.model.load import load_tokenizer as load

    return load(name)


def _chat_tokenizer(tokenizer: Any, convs: list[Conversation]) -> Any:
    """`tokenizer` with a chat template installed the way training chooses it (chat data only)."""
    from tunesmith.data.templates import choose_template

    if any(c.kind in ("chat", "preference") for c in convs):
        choose_template(tokenizer, "auto")
    return tokenizer


def _score_by_name(name: str | None, tokenizer: Any, convs: list[Conversation], cases: list[EvalCase],
                   max_new_tokens: int) -> Any:
    """Load a model, score it, and free it before the next one loads."""
    from tunesmith.eval.preference import preference_pairs
    from tunesmith.eval.run import loss_samples, score_model
    from tunesmith.model.load import load_model

    samples = loss_samples(convs, tokenizer)
    pairs = preference_pairs(convs, tokenizer)
    scored = f"{len(pairs)} preference pairs" if pairs else f"loss on {len(samples)} samples"
    print(f"eval {short_name(name)}: {scored}, {len(cases)} greedy replies", file=sys.stderr)
    model = load_model(name)
    result = score_model(model, tokenizer, samples, cases, max_new_tokens, pairs)
    del model
    gc.collect()
    return result


def short_name(name: str | None) -> str:
    """A display name: the directory's name, or the hub id; None is the bundled starter."""
    if name is None:
        return "starter"
    path = Path(name)
    return path.name if path.exists() else name


def summary_text(result: dict[str, Any], names: tuple[str, str | None] = ("tuned", "base")) -> str:
    """The metric table as aligned plain text, for the terminal."""
    header = table_header(result, names)
    table = [header] + [row_cells(result, r) for r in metric_rows(result)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += skipped_lines(result)
    return "\n".join(lines)

