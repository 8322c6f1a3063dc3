"""The model card (README.md) a push uploads: YAML metadata the Hub indexes, then what a reader
needs to trust and use the model: the data, the method, the chat template and stop tokens,
the base-vs-tuned evaluation, and how to load it in each runtime.

Everything is taken from what the run wrote (config.yaml, summary.json, report.md,
generation_config.json, the tokenizer's template), never typed in by hand, so the card
cannot disagree with the files it describes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tunesmith.export.source import ExportSource

HYPER = ("method", "lora_r", "lora_alpha", "lora_targets", "epochs", "max_steps", "lr", "warmup_ratio",
         "weight_decay", "batch_tokens", "grad_accum", "grad_clip", "max_length", "seed")


def is_hub_id(name: str | None) -> bool:
    """ORG/NAME that is not a local path (a local file or directory never counts)."""
    return bool(name) and name.count("/") == 1 and not Path(name).expanduser().exists() \
        and not name.startswith((".", "/", "~"))


def run_datasets(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The datasets of a run's config.yaml, one mapping each (`data` is a path, or a list of mix entries)."""
    data = run.get("data")
    if not data:
        return []
    entries = data if isinstance(data, list) else [data]
    return [e if isinstance(e, dict) else {"path": str(e)} for e in entries]


def data_facts(run: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """Where the data came from, its format, and how many samples (read again from the files that are there)."""
    from tunesmith.data.readers import read_conversations

    datasets = run_datasets(run)
    source = ", ".join(d["path"] for d in datasets) or "the bundled example dataset"
    facts: dict[str, Any] = {"source": source, "format": run.get("format", "auto")}
    local = [d for d in datasets if Path(d["path"]).expanduser().is_file()]
    if local and len(local) == len(datasets):
        formats, samples = set(), 0
        for d in local:
            convs, report = read_conversations(d["path"], d.get("format") or run.get("format", "auto"),
                                               d.get("columns") or run.get("columns"),
                                               d.get("system") or run.get("system"), bool(run.get("skip_invalid")))
            samples += len(convs)
            formats.add(report.format)
        facts.update(samples=samples, format=", ".join(sorted(formats)))
    if path is not None and (path / "eval.jsonl").is_file():
        facts["held_out"] = sum(1 for line in (path / "eval.jsonl").open(encoding="utf-8") if line.strip())
    return facts


def eval_table(path: Path | None) -> str | None:
    """The metric table of report.md (base vs tuned), as markdown, or None when there is no report."""
    report = path / "report.md" if path is not None else None
    if report is None or not report.is_file():
        return None
    rows = [line for line in report.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    return "\n".join(rows) if rows else None


def card_metadata(source: ExportSource, merged: bool, exported: list[str]) -> dict[str, Any]:
    """The YAML header: base_model, library_name, license, datasets (hub only), tags, pipeline_tag."""
    run, base = source.run, source.base_model
    meta: dict[str, Any] = {}
    if is_hub_id(base):
        meta["base_model"] = base
    meta["library_name"] = "peft" if source.is_adapter and not merged else "transformers"
    meta["license"] = run.get("license") or "other"  # a fine-tune inherits its base's license terms
    hub = [d["path"] for d in run_datasets(run) if is_hub_id(d["path"])]
    if hub:
        meta["datasets"] = hub
    tags = ["tunesmith", run.get("method", "full"), run.get("objective", "sft"), *exported]
    if source.is_adapter and not merged:
        tags.append("lora")
    meta["tags"] = list(dict.fromkeys(tags))
    meta["pipeline_tag"] = "text-generation"
    return meta


def _data_section(facts: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    lines = ["## Data", "", f"- source: `{facts['source']}` (format: {facts['format']})"]
    if "samples" in facts:
        lines.append(f"- samples: {facts['samples']}")
    if "held_out" in facts:
        lines.append(f"- held out for evaluation: {facts['held_out']}")
    if "tokens" in summary:
        lines.append(f"- tokens trained on: {int(summary['tokens']):,} in {int(summary.get('steps', 0))} steps")
    return lines


def _method_section(run: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    lines = ["## Method", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | {run[k]} |" for k in HYPER if k in run and run[k] is not None]
    for key in ("final_train_loss", "final_eval_loss", "final_eval_perplexity"):
        if key in summary:
            lines.append(f"| {key} | {summary[key]:.4f} |")
    return lines


def _template_section(source: ExportSource) -> list[str]:
    template = getattr(source.tokenizer, "chat_template", None) or "(none: plain text model)"
    stops = ", ".join(f"`{s}` (id {i})" for s, i in zip(source.stop_strings(), source.end_of_turn_ids))
    lines = ["## Chat template and stop tokens", "",
             f"Generation stops at: {stops}. These are `eos_token_id` in generation_config.json, and EOS/EOT in "
             "the GGUF.", ""]
    if source.system_prompt:
        lines += [f"Training system prompt: `{source.system_prompt}`", ""]
    return lines + ["```jinja", template, "```"]


def _usage_section(repo: str, source: ExportSource, merged: bool, exported: list[str]) -> list[str]:
    lines = ["## How to use", "", "```python", "from transformers import pipeline", "",
             f'pipe = pipeline("text-generation", model="{repo}")',
             'print(pipe([{"role": "user", "content": "Hello!"}], max_new_tokens=128)[0]["generated_text"][-1])',
             "```"]
    if source.is_adapter and not merged:
        lines += ["", "As a PEFT adapter on its base:", "", "```python",
                  "from peft import AutoPeftModelForCausalLM", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")', "```"]
    lines += ["", "With tunesmith:", "", "```bash", f"tunesmith chat {repo}", "```"]
    if "gguf" in exported:
        lines += ["", "With llama.cpp (the GGUF carries the chat template and stop tokens):", "", "```bash",
                  f"llama-cli -hf {repo} -cnv", "```"]
    if "ollama" in exported:
        lines += ["", "With Ollama (download the GGUF and the Modelfile, then):", "", "```bash",
                  "ollama create my-model -f Modelfile && ollama run my-model", "```"]
    return lines


def model_card(source: ExportSource, repo: str, merged: bool = False, exported: list[str] | None = None) -> str:
    """README.md text for `repo`: YAML metadata, then data, method, template, evaluation, usage."""
    exported = exported or []
    run, summary = source.run, source.summary
    base = source.base_model or "the bundled tunesmith starter model"
    kind = "a LoRA adapter" if source.is_adapter and not merged else "a fine-tuned model"
    body = [f"# {repo.split('/')[-1]}", "",
            f"{kind[0].upper() + kind[1:]} of `{base}`, trained with [tunesmith](https://pypi.org/project/tunesmith/) "
            f"({run.get('method', 'full')}, {run.get('objective', 'sft')}).", ""]
    body += _data_section(data_facts(run, source.path), summary) + [""]
    body += _method_section(run, summary) + [""]
    body += _template_section(source) + [""]
    table = eval_table(source.path)
    body += ["## Evaluation (held-out data, base vs tuned)", "", table or "No evaluation report was written "
             "for this run (`tunesmith eval MODEL --compare base` writes one).", ""]
    body += _usage_section(repo, source, merged, exported)
    header = yaml.safe_dump(card_metadata(source, merged, exported), sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n" + "\n".join(body) + "\n"


def write_card(directory: Path, text: str) -> Path:
    """Write README.md into `directory` (the upload folder)."""
    path = directory / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


__all__ = ["card_metadata", "eval_table", "model_card", "write_card"]
