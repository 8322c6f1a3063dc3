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
