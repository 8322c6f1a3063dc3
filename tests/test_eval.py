"""Evaluation end to end on CPU: a tiny model trained here on a toy task beats its untrained base.

The toy task: the reply is POSITIVE when the prompt names a cat or a bird, NEGATIVE for a
dog or a fish, amid random filler words. A ~100k-parameter Llama learns it in ~80 plain
PyTorch steps (written here on purpose: the real trainer is tested on its own).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from html import escape
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tunesmith
from tunesmith.data.conversation import Conversation, Turn
from tunesmith.errors import UserError
from tunesmith.eval.data import default_data, eval_cases, read_eval_data
from tunesmith.eval.report import base_model_name, compare_models, evaluate, report_after_training

FILLER = "the a sun moon tree river stone red blue green small big quick slow".split()
ANIMALS = {"cat": "POSITIVE", "bird": "POSITIVE", "dog": "NEGATIVE", "fish": "NEGATIVE"}


def toy_conversations(n: int, seed: int) -> list[Conversation]:
    """Prompts with one animal among filler words; the reply is the animal's label."""
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        animal = rng.choice(list(ANIMALS))
        words = [rng.choice(FILLER) for _ in range(4)]
        words.insert(rng.randint(0, 4), animal)
        convs.append(Conversation([Turn("user", "tell me about " + " ".join(words)),
                                   Turn("assistant", ANIMALS[animal])], source=f"toy:{i}"))
    return convs


def train_toy(model_dir: Path, out_dir: Path, steps: int = 80) -> Path:
    """Full fine-tune of the model in `model_dir` on the toy task (one padded batch, AdamW)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.tokenize import tokenize_all

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples, _ = tokenize_all(toy_conversations(64, seed=0), tokenizer, 128)
    width = max(len(s.input_ids) for s in samples)
    ids = torch.zeros((len(samples), width), dtype=torch.long)  # (B, T)
    labels = torch.full_like(ids, -100)  # (B, T), HF shifts them itself
    mask = torch.zeros_like(ids)  # (B, T)
    for row, s in enumerate(samples):
        ids[row, :len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[row, :len(s.labels)] = torch.tensor(s.labels)
        mask[row, :len(s.input_ids)] = 1
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_messages(convs: list[Conversation], path: Path) -> Path:
    """Conversations as a messages-format JSONL file."""
    path.write_text("".join(json.dumps({"messages": c.messages()}) + "\n" for c in convs), encoding="utf-8")
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The untrained base, the tuned model, held-out data, and one evaluate() run comparing them."""
    root = tmp_path_factory.mktemp("toy")
    tuned = train_toy(tiny_model_dir, root / "tuned")
    (tuned / "loss.png").write_bytes(TINY_PNG)  # what train leaves beside the model
    data = write_messages(toy_conversations(12, seed=1), root / "heldout.jsonl")
    result = evaluate(str(tuned), str(data), compare=str(tiny_model_dir), report=str(root / "report" / "report.html"),
                      max_new_tokens=10)
    return SimpleNamespace(base=tiny_model_dir, tuned=tuned, data=data, result=result, root=root)


def test_tuned_beats_base_on_exact_match_and_loss(toy: SimpleNamespace) -> None:
    tuned, base = toy.result["model"], toy.result["base"]
    assert tuned["exact_match"] >= 0.75 > base["exact_match"]
    assert tuned["loss"] < base["loss"] - 3
    assert tuned["label_accuracy"] >= tuned["exact_match"]  # labels POSITIVE / NEGATIVE were detected
    assert tuned["uppercase_share"] > 0.9 and tuned["ended_share"] == 1.0
    assert toy.result["difference"]["exact_match"] == pytest.approx(tuned["exact_match"] - base["exact_match"])
    assert toy.result["samples"] == {"loss": 12, "prompts": 12}
    assert toy.result["reference"]["uppercase_share"] == 1.0


def test_report_shows_prompt_reference_and_both_replies(toy: SimpleNamespace) -> None:
    html = Path(toy.result["report"]["html"]).read_text(encoding="utf-8")
    md = Path(toy.result["report"]["md"]).read_text(encoding="utf-8")
    examples = toy.result["examples"]
    assert len(examples) == 12
    for ex in examples:
        assert {"reply", "base_reply", "reference"} <= set(ex)
        assert escape(ex["prompt"][-1]["content"]) in html and escape(ex["reply"]) in html
        assert ex["prompt"][-1]["content"] in md
    assert html.count('class="reply') == 2 * len(examples)  # base and tuned, side by side, per prompt
    assert md.count(f"**{toy.tuned.name}**") == len(examples) and md.count(f"**{toy.base.name}**") == len(examples)
    assert "exact match" in html and "chrF" in md


def test_html_is_self_contained(toy: SimpleNamespace) -> None:
    html = Path(toy.result["report"]["html"]).read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, flags=re.I)
    assert "<script" not in html and "@import" not in html and "url(" not in html
    assert "data:image/png;base64," in html  # the loss curve travels inside the page


def test_compare_models_writes_both_reports(toy: SimpleNamespace, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy.tuned)
    base = AutoModelForCausalLM.from_pretrained(toy.base)
    tuned = AutoModelForCausalLM.from_pretrained(toy.tuned)
    convs = read_eval_data(str(toy.data))
    result = compare_models(base, tuned, tokenizer, convs, tmp_path, max_prompts=4, loss_curve=None)
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.md").is_file()
    assert result["samples"] == {"loss": 12, "prompts": 4}
    assert result["model"]["loss"] == pytest.approx(toy.result["model"]["loss"], rel=1e-4)
    assert result["model"]["exact_match"] > result["base"]["exact_match"]


def test_compare_models_scores_a_peft_base_with_the_adapter_off(toy: SimpleNamespace, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy.tuned)
    base_loss = toy.result["base"]["loss"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(toy.base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a non-zero adapter, so tuned != base
    convs = read_eval_data(str(toy.data))
    result = compare_models(model, model, tokenizer, convs, tmp_path, max_prompts=1)
    assert result["base"]["loss"] == pytest.approx(base_loss, rel=1e-4)
    assert abs(result["model"]["loss"] - base_loss) > 1e-2


def test_report_after_training_loads_the_named_base(toy: SimpleNamespace, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tuned = AutoModelForCausalLM.from_pretrained(toy.tuned)
    (tmp_path / "loss.png").write_bytes(TINY_PNG)
    result = report_after_training(tuned, AutoTokenizer.from_pretrained(toy.tuned), read_eval_data(str(toy.data)),
                                   tmp_path, str(toy.base), max_prompts=2)
    assert result["base"]["loss"] == pytest.approx(toy.result["base"]["loss"], rel=1e-4)
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text(encoding="utf-8")
    err = capsys.readouterr().err
    assert "exact match" in err and f"report: {tmp_path / 'report.html'}" in err


def test_prompts_without_references_get_reply_stats_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "out"
    shutil.copytree(tiny_model_dir, model)
    (model / "eval.jsonl").write_text('{"prompt": "hello there"}\n{"question": "what is the sun"}\n',
                                      encoding="utf-8")
    result = tunesmith.evaluate(str(model), max_new_tokens=4)  # no --data: the output dir's eval.jsonl
    assert result["data"] == str(model / "eval.jsonl")
    assert set(result["model"]) == {"mean_length", "ended_share", "repetition_rate", "uppercase_share"}
    assert set(result["skipped"]) == {"loss", "perplexity", "exact_match", "label_accuracy", "rouge_l", "chrf"}
    assert all("no reference replies" in why for why in result["skipped"].values())
    assert result["report"] is None and len(result["examples"]) == 2


def test_text_documents_get_loss_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "the cat sat on the mat"}\n{"text": "a dog ran"}\n', encoding="utf-8")
    result = evaluate(str(tiny_model_dir), str(data))
    assert set(result["model"]) == {"loss", "perplexity"} and "generation" in result["skipped"]


def test_preference_data_is_read_as_pairs_with_the_chosen_reply_as_reference(tmp_path: Path) -> None:
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n', encoding="utf-8")
    convs = read_eval_data(str(data))
    assert [c.kind for c in convs] == ["preference"]
    case = eval_cases(convs, 5)[0]
    assert case.prompt == [{"role": "user", "content": "hi"}] and case.reference == "hello"


def test_missing_default_data_names_the_fix(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="holds no eval.jsonl.*pass --data FILE"):
        evaluate(str(tiny_model_dir))
    (tmp_path / "eval.jsonl").write_text("")
    with pytest.raises(UserError, match="held out no samples"):
        default_data(str(tmp_path))


def test_bad_options_are_user_errors(tiny_model_dir: Path) -> None:
    with pytest.raises(UserError, match="max_new_tokens"):
        evaluate(str(tiny_model_dir), "x.jsonl", max_new_tokens=0)
    with pytest.raises(UserError, match="unknown option"):
        evaluate(str(tiny_model_dir), "x.jsonl", temperature=0.5)


def test_compare_base_reads_the_adapter_or_run_config(tmp_path: Path) -> None:
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert base_model_name(str(adapter), "base") == "org/base"
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    (full / "config.yaml").write_text("model: org/other\nlr: 0.001\n")
    assert base_model_name(str(full), "base") == "org/other"
    assert base_model_name(str(full), "some/model") == "some/model"
    (full / "config.yaml").unlink()
    with pytest.raises(UserError, match="--compare NAME"):
        base_model_name(str(full), "base")


# A valid 1x1 PNG, standing in for the loss curve train writes.
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360f8cfc0f01f0005000201a2dd56b10000000049454e44ae426082")
