"""End to end through `finetune`: full and LoRA runs overfit a tiny dataset, learn to stop, and
leave an output directory that transformers.pipeline and peft load."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tunesmith.errors import UserError

QA = [("What is the capital of France?", "Paris is the capital."), ("Say hello", "Hello world!"),
      ("Count to three", "One two three."), ("What color is the sky?", "The sky is blue."),
      ("Name a pet", "A small cat."), ("What is two plus two?", "Two plus two equals four.")]


def write_qa(path: Path, pairs: list[tuple[str, str]] = QA) -> Path:
    """A messages-format JSONL file of single-turn question/answer pairs."""
    with path.open("w", encoding="utf-8") as f:
        for q, a in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def confident_model_dir(src: Path, dst: Path) -> Path:
    """The tiny model with 10x embeddings (tied to the head), so its logits can be confident.

    A random model with std-0.02 embeddings caps every logit near 1; full fine-tuning can
    grow the frozen-for-LoRA embeddings and norms, LoRA cannot. Scaling the head makes the
    tiny model behave like a pretrained one, whose head is already confident.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def greedy_answers(model, tokenizer, pairs=QA, max_new_tokens: int = 24) -> list[tuple[str, bool]]:
    """(greedy reply, whether it stopped on an end-of-turn id before the token limit) per prompt."""
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    out = []
    for q, _a in pairs:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        out.append((tokenizer.decode(new, skip_special_tokens=True), bool(new) and new[-1] in eos))
    return out


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    from tunesmith.train.api import finetune

    tmp = tmp_path_factory.mktemp("full")
    data = write_qa(tmp / "qa.jsonl")
    return finetune(model=str(tiny_model_dir), data=str(data), method="full", lr=3e-3, max_steps=50,
                    eval_data=str(data), output=str(tmp / "out"), report=False)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    from tunesmith.train.api import finetune

    tmp = tmp_path_factory.mktemp("lora")
    base = confident_model_dir(tiny_model_dir, tmp / "base")
    data = write_qa(tmp / "qa.jsonl")
    return finetune(model=str(base), data=str(data), method="lora", lora_r=64, lora_alpha=64, lr=1e-2,
                    max_steps=50, test_split=0.0, merge=True, output=str(tmp / "out"), report=False)


def test_full_run_reproduces_answers_and_stops(full_run):
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(full_run.output_dir))
    answers = greedy_answers(pipe.model, pipe.tokenizer)
    assert answers == [(a, True) for _q, a in QA]
    reply = pipe([{"role": "user", "content": QA[1][0]}], do_sample=False, max_new_tokens=24)
    assert reply[0]["generated_text"][-1]["content"] == QA[1][1]


def test_full_run_metrics_and_files(full_run):
    out, m = full_run.output_dir, full_run.metrics
    assert m["steps"] == 50 and m["tokens"] > 0 and m["tokens_per_s"] > 0
    assert m["final_eval_loss"] < m["base_eval_loss"] and m["best_eval_loss"] <= m["final_eval_loss"] + 1e-9
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "config.yaml",
                 "metrics.jsonl", "loss.png", "summary.json", "eval.jsonl"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "full" and config["max_steps"] == 50 and config["lr"] == 3e-3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 51))
    assert records[0]["step"] == 0 and "eval_loss" in records[0]  # the base model's loss comes first
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|eot_id|>") in eos


def test_lora_adapter_loads_with_peft_and_pipeline(lora_run):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer, pipeline

    out = lora_run.output_dir
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out)
    peft_model.generation_config.eos_token_id = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert greedy_answers(peft_model, tokenizer) == [(a, True) for _q, a in QA]
    pipe = pipeline("text-generation", model=str(out))
    reply = pipe([{"role": "user", "content": QA[0][0]}], do_sample=False, max_new_tokens=24)
    assert reply[0]["generated_text"][-1]["content"] == QA[0][1]


def test_lora_merged_weights_are_a_standalone_model(lora_run):
    from transformers import pipeline

    merged = lora_run.output_dir / "merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    pipe = pipeline("text-generation", model=str(merged))
    assert greedy_answers(pipe.model, pipe.tokenizer) == [(a, True) for _q, a in QA]


def test_unknown_option_and_bad_value_are_user_errors(tmp_path):
    from tunesmith.train.api import finetune

    with pytest.raises(UserError, match="unknown option"):
        finetune(modle="x")
    with pytest.raises(UserError, match="lr"):
        finetune(lr=5.0)


def test_resume_without_checkpoint_and_unfinished_run_are_refused(tmp_path):
    from tunesmith.train.api import find_resume_checkpoint

    with pytest.raises(UserError, match="no checkpoint"):
        find_resume_checkpoint(tmp_path, resume=True)
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000004" / "state.json").write_text("{}")
    with pytest.raises(UserError, match="unfinished run"):
        find_resume_checkpoint(tmp_path, resume=False)
    assert find_resume_checkpoint(tmp_path, resume=True).name == "step-000004"
    assert (tmp_path / "checkpoints" / "step-000004").is_dir()  # finding never deletes


def test_out_of_memory_becomes_advice(tiny_model_dir, tmp_path, monkeypatch):
    import tunesmith.train.loop as loop
    from tunesmith.train.api import finetune

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "accumulate", oom)
    with pytest.raises(UserError, match="out of GPU memory") as info:
        finetune(model=str(tiny_model_dir), data=str(write_qa(tmp_path / "qa.jsonl")), max_steps=2,
                 batch_tokens=4096, test_split=0.0, output=str(tmp_path / "out"), report=False)
    assert "--batch-tokens (now 4096)" in info.value.problems[0] and "--gradient-checkpointing" in info.value.problems[0]


def test_a_finished_run_in_the_output_dir_is_replaced(tmp_path):
    from tunesmith.train.api import clear_previous_run, find_resume_checkpoint

    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000002" / "state.json").write_text("{}")
    (tmp_path / "summary.json").write_text("{}")
    assert find_resume_checkpoint(tmp_path, resume=False) is None
    assert (tmp_path / "summary.json").exists()
    clear_previous_run(tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "summary.json").exists()
    with pytest.raises(UserError, match="is not a directory"):
        (tmp_path / "file").write_text("x")
        find_resume_checkpoint(tmp_path / "file", resume=False)


def test_a_base_that_does_not_stop_at_end_of_turn_is_flagged_for_adapter_dirs(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny import with_method
    from tunesmith.train.output import adapter_stop_notice

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    model = with_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "lora")
    assert adapter_stop_notice(model, tokenizer, [eot], tmp_path) is None  # the base already stops there
    model.get_base_model().generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    notice = adapter_stop_notice(model, tokenizer, [eot], tmp_path)
    assert "<|eot_id|>" in notice and str(tmp_path / "merged") in notice


def test_out_of_memory_prints_the_memory_plans_advice(tiny_model_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import tunesmith.train.loop as loop
    from tunesmith.train.api import finetune

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop, "accumulate", oom)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=24 * 2**30))
    with pytest.raises(UserError, match="out of GPU memory") as info:
        finetune(model=str(tiny_model_dir), data=str(write_qa(tmp_path / "qa.jsonl")), max_steps=2,
                 test_split=0.0, output=str(tmp_path / "out"), report=False)
    assert any(p.startswith("memory plan for 24.0 GiB: --method lora --batch-tokens") for p in info.value.problems)
