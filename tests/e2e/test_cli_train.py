"""`tunesmith train` as a subprocess: a LoRA run end to end with a progress bar; bad input exits 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def train(*args: str) -> subprocess.CompletedProcess:
    """Run `tunesmith train ARGS` in a fresh process, offline."""
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *args], capture_output=True, text=True,
                          timeout=180, env=ENV)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    from test_train_api import QA, write_qa

    return write_qa(tmp_path_factory.mktemp("data") / "examples.jsonl", QA * 2)


def test_lora_run_end_to_end(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    proc = train("--model", str(tiny_model_dir), "--data", str(data_file), "--method", "lora", "--max-steps", "4",
                 "--save-every", "2", "--merge", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"output: {out}" in proc.stdout
    assert "train" in proc.stderr and "4/4" in proc.stderr  # the progress bar reached the end
    assert "steps 4" in proc.stderr and "eval loss: base" in proc.stderr  # the summary
    for name in ("adapter_model.safetensors", "adapter_config.json", "generation_config.json", "config.yaml",
                 "metrics.jsonl", "loss.png", "summary.json", "eval.jsonl", "merged/model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--lr", "5"], "lr"),
    (["--method", "sgd"], "method"),
    (["--batch-tokens", "0"], "batch_tokens"),
])
def test_bad_paths_and_values_exit_2_with_a_clear_line(tiny_model_dir, data_file, tmp_path, args, message):
    base = {"--model": str(tiny_model_dir), "--data": str(data_file), "--output": str(tmp_path / "out")}
    base.update(dict(zip(args[::2], args[1::2])))
    proc = train(*[x for kv in base.items() for x in kv], "--max-steps", "1")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    settings = proc.stderr.startswith("settings:\n")  # printed once the options are valid
    problem = proc.stderr.split("\n", 7)[-1] if settings else proc.stderr
    assert problem.startswith("tunesmith: "), proc.stderr


def test_resume_without_checkpoint_exits_2(tiny_model_dir, data_file, tmp_path):
    proc = train("--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(tmp_path), "--resume")
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_config_yaml_records_the_lr_used_and_sources_and_reruns_the_same(tiny_model_dir, data_file, tmp_path):
    import yaml

    settings = tmp_path / "run.yaml"
    settings.write_text("max_steps: 2\nseed: 3\n", encoding="utf-8")
    out, again = tmp_path / "out", tmp_path / "again"
    proc = train("--config", str(settings), "--model", str(tiny_model_dir), "--data", str(data_file),
                 "--method", "lora", "--no-report", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["lr"] == 2e-4  # the recipe's LoRA rate that ran, not null
    assert saved["sources"]["lr"] == "default for lora x sft"
    assert saved["sources"]["method"] == "flag --method" and saved["sources"]["report"] == "flag --no-report"
    assert saved["sources"]["max_steps"] == f"config {settings}:1" and saved["sources"]["seed"] == f"config {settings}:2"
    assert saved["sources"]["objective"] == "default" and "weight_decay" not in saved["sources"]  # plain defaults
    assert saved["batch_tokens"] == 8192 and saved["sources"]["batch_tokens"].startswith("default: the memory plan")

    proc = train("--config", str(out / "config.yaml"), "--output", str(again))
    assert proc.returncode == 0, proc.stderr
    rerun = yaml.safe_load((again / "config.yaml").read_text(encoding="utf-8"))
    assert {k: v for k, v in rerun.items() if k not in ("output", "sources")} == \
        {k: v for k, v in saved.items() if k not in ("output", "sources")}
    line = next(n for n, text in enumerate((out / "config.yaml").read_text().splitlines(), 1) if text.startswith("lr:"))
    assert rerun["sources"]["lr"] == f"config {out / 'config.yaml'}:{line}"

    def losses(directory: Path) -> list[float]:
        rows = [json.loads(r) for r in (directory / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if "train_loss" in r]

    assert losses(again) == losses(out) and len(losses(out)) == 2  # the rerun reproduces the run
