"""DPO / ORPO end to end through `finetune` (the one loop): held-out preference rises, the full-FT
reference pass is cached and invalidated, resume reproduces the curve, wrong data is refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.errors import UserError

BUNDLED = Path(__file__).resolve().parent.parent / "src" / "tunesmith" / "assets" / "examples" / "preferences.jsonl"


def write_pairs(path: Path, n: int = 12) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What is {i} plus one?", "chosen": f"It is {i + 1}.",
                                "rejected": f"No idea, maybe {i * 7}!"}) + "\n")
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_dpo_on_the_bundled_pairs_beats_the_base(tiny_model_dir, tmp_path, one_thread):
    from tunesmith import evaluate
    from tunesmith.train.api import finetune

    out = tmp_path / "dpo"
    result = finetune(model=str(tiny_model_dir), data=str(BUNDLED), objective="dpo", method="lora", lora_r=8,
                      lr=1e-2, epochs=3, batch_tokens=1024, test_split=0.2, report=False, output=str(out))
    steps = [r for r in records(out) if "train_loss" in r]
    for key in ("reward_accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logp", "rejected_logp"):
        assert key in steps[-1]
    m = result.metrics
    assert m["base_eval_margin"] == pytest.approx(0.0, abs=1e-6)  # the reference IS the base: rewards start at 0
    assert m["final_eval_reward_accuracy"] >= 0.8 and m["final_eval_loss"] < m["base_eval_loss"] - 0.05
    scored = evaluate(str(out), compare="base", max_new_tokens=4, max_prompts=2,  # held-out pairs, reloaded
                      report=str(tmp_path / "report.html"))
    tuned, base = scored["model"], scored["base"]
    assert tuned["preference_accuracy"] > base["preference_accuracy"]
    assert tuned["preference_margin"] > base["preference_margin"] + 1.0
    # `tunesmith eval`'s implicit reward (tuned - base log-probs) is training's eval margin over beta
    assert tuned["reward_margin"] == pytest.approx(m["final_eval_margin"] / 0.1, rel=1e-3)
    assert tuned["reward_accuracy"] == pytest.approx(m["final_eval_reward_accuracy"])
    assert scored["examples"][0]["reference"] and "base_reply" in scored["examples"][0]
    assert "pairs where chosen is likelier" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_full_dpo_reference_pass_is_cached_reused_and_invalidated(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    from test_train_api import confident_model_dir

    import tunesmith.train.reference as reference
    from tunesmith.train.api import finetune

    calls = []
    real = reference.score_pairs
    monkeypatch.setattr(reference, "score_pairs", lambda model, pairs, *a: calls.append(len(pairs)) or real(model, pairs, *a))
    data = write_pairs(tmp_path / "p.jsonl")
    options = dict(objective="dpo", method="full", lr=1e-3, max_steps=2, batch_tokens=256, test_split=0.25,
                   report=False, output=str(tmp_path / "out"))

    def run(model: Path, data: Path) -> dict:
        calls.clear()
        return finetune(model=str(model), data=str(data), **options).metrics

    first = run(tiny_model_dir, data)
    assert calls == [9, 3] and first["base_eval_margin"] == pytest.approx(0.0, abs=1e-5)
    cached = sorted((tmp_path / "out" / ".cache").glob("*/reference-*.npz"))
    assert len(cached) == 1
    again = run(tiny_model_dir, data)
    assert calls == [] and again["final_eval_loss"] == pytest.approx(first["final_eval_loss"], abs=1e-6)
    other_model = confident_model_dir(tiny_model_dir, tmp_path / "other")
    run(other_model, data)
    assert calls == [9, 3] and len(list((tmp_path / "out" / ".cache").glob("*/reference-*.npz"))) == 2
    more = write_pairs(tmp_path / "p2.jsonl", 16)
    run(tiny_model_dir, more)
    assert calls == [12, 4]


def test_resume_reproduces_the_dpo_loss_curve(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    import tunesmith.train.loop as loop
    from tunesmith.train.api import finetune

    data = write_pairs(tmp_path / "p.jsonl", 16)

    def options(out: str) -> dict:
        return dict(model=str(tiny_model_dir), data=str(data), objective="dpo", method="full", lr=3e-3, max_steps=6,
                    batch_tokens=192, grad_accum=2, save_every=2, eval_every=3, test_split=0.2, report=False,
                    output=str(tmp_path / out))

    finetune(**options("straight"))
    real_step, done = loop.optimizer_step, {"n": 0}

    def crash_at_step_5(optimizer, scheduler, clip):
        if done["n"] == 4:
            raise KeyboardInterrupt
        done["n"] += 1
        return real_step(optimizer, scheduler, clip)

    monkeypatch.setattr(loop, "optimizer_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(**options("resumed"))
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    finetune(**options("resumed"), resume=True)
    keys = ("train_loss", "eval_loss", "margin", "reward_accuracy", "eval_margin")
    curve = {out: {(r["step"], k): r[k] for r in records(tmp_path / out) for k in keys if k in r}
             for out in ("straight", "resumed")}
    assert curve["straight"].keys() == curve["resumed"].keys()
    assert len([k for k in curve["straight"] if k[1] == "train_loss"]) == 6
    for key, value in curve["straight"].items():
        assert curve["resumed"][key] == pytest.approx(value, abs=1e-5), key


def test_orpo_trains_without_a_reference(tiny_model_dir, tmp_path, one_thread):
    from tunesmith.train.api import finetune

    out = tmp_path / "orpo"
    m = finetune(model=str(tiny_model_dir), data=str(write_pairs(tmp_path / "p.jsonl")), objective="orpo",
                 method="lora", lr=1e-2, max_steps=8, batch_tokens=256, test_split=0.25, report=False,
                 output=str(out)).metrics
    assert m["final_eval_loss"] < m["base_eval_loss"] and m["final_eval_chosen_nll"] < m["base_eval_chosen_nll"]
    assert "log_odds" in records(out)[-2]


def test_wrong_data_for_the_objective_is_refused_in_one_line(tiny_model_dir, tmp_path):
    from test_train_api import write_qa

    from tunesmith.train.api import finetune

    with pytest.raises(UserError, match="preference data cannot train with --objective sft") as info:
        finetune(model=str(tiny_model_dir), data=str(BUNDLED), objective="sft", output=str(tmp_path / "a"))
    assert info.value.problems == ["fix: use --objective dpo or orpo"]
    chat = write_qa(tmp_path / "qa.jsonl")
    result = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "--model", str(tiny_model_dir),
                             "--data", str(chat), "--objective", "dpo", "--output", str(tmp_path / "b")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tunesmith:")]
    assert errors == [f"tunesmith: {chat}: chat data cannot train with --objective dpo"]  # after the settings block


def test_live_reference_gives_the_cached_reference_loss(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    import tunesmith.train.reference as reference
    from tunesmith.train.api import finetune

    data = write_pairs(tmp_path / "p.jsonl", 16)
    options = dict(model=str(tiny_model_dir), data=str(data), objective="dpo", method="full", lr=3e-3, max_steps=4,
                   batch_tokens=192, eval_every=2, test_split=0.25, report=False)
    finetune(**options, output=str(tmp_path / "cached"))
    calls = []
    monkeypatch.setattr(reference, "score_pairs", lambda *a, **k: calls.append(1))  # live: no pass before training
    finetune(**options, reference="live", output=str(tmp_path / "live"))
    assert calls == [] and not list((tmp_path / "live" / ".cache").glob("*/reference-*.npz"))
    keys = ("train_loss", "eval_loss", "margin", "chosen_reward", "rejected_reward", "eval_margin")
    curve = {out: {(r["step"], k): r[k] for r in records(tmp_path / out) for k in keys if k in r}
             for out in ("cached", "live")}
    assert curve["cached"].keys() == curve["live"].keys()
    assert len([k for k in curve["cached"] if k[1] == "train_loss"]) == 4
    assert curve["cached"][(1, "margin")] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    assert curve["cached"][(4, "train_loss")] != pytest.approx(curve["cached"][(1, "train_loss")], abs=1e-3)  # it moved
    for key, value in curve["cached"].items():  # the live copy stays the starting weights: same rewards, same loss
        assert curve["live"][key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.parametrize("options, needle", [
    (dict(method="lora", objective="dpo"), "already live"),
    (dict(method="full", objective="orpo"), "has no reference model"),
    (dict(method="full", objective="dpo", reference="copy"), "allowed: cached | live"),
])
def test_live_reference_is_refused_where_it_means_nothing(options, needle):
    from tunesmith.config import train_config

    with pytest.raises(UserError, match=needle):
        train_config({"model": "org/m", "reference": "live", **options})
