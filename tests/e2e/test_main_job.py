"""The zero-argument main job: `tunesmith train` = bundled starter + caps_tweets.jsonl, offline.

Runs it as a subprocess with a reduced step budget, checks the output directory is complete
and loadable, and that greedy replies to held-out topics have a higher share of upper-case
letters after training than the starter gives.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.model.load import STARTER_DIR

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (STARTER_DIR / "model.safetensors").is_file(), reason="no starter model")]


def replies(model_dir: Path, prompts: list[list[dict[str, str]]]) -> list[str]:
    """Greedy replies (at most 24 new tokens) of the model in `model_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for messages in prompts:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.1)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def test_zero_argument_train(tmp_path: Path) -> None:
    from tunesmith.eval.metrics import uppercase_share

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "--max-steps", "8", "--batch-tokens", "1024", "--no-report"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "tunesmith-output"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json", "eval.jsonl", "summary.json"):
        assert (out / name).is_file(), f"{name} missing; have {sorted(p.name for p in out.iterdir())}"
    held_out = [json.loads(line) for line in (out / "eval.jsonl").read_text(encoding="utf-8").splitlines()][:5]
    prompts = [[t for t in row["messages"] if t["role"] != "assistant"] for row in held_out]
    assert prompts and all(p[-1]["content"].startswith("The topic is:") for p in prompts)
    before, after = uppercase_share(replies(STARTER_DIR, prompts)), uppercase_share(replies(out, prompts))
    assert after > before + 0.2, (before, after)
