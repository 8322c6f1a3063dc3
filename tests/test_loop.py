"""The loop: accumulation parity, schedule, resume reproducibility, NaN stop."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from tunesmith.data.packing import pack
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
from tunesmith.train.loop import accumulate
from tunesmith.train.losses import sft_loss_sum
from tunesmith.train.schedule import lr_factor

CPU = torch.device("cpu")


def samples(n: int, vocab: int, seed: int = 0) -> list[TokenizedSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(5, vocab) for _ in range(rng.randint(5, 25))]
        out.append(TokenizedSample(ids, [IGNORE_INDEX] * 3 + ids[3:]))
    return out


def grads_after(model, micro_batches) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _metrics, _n = accumulate(model, micro_batches, sft_loss_sum, CPU)
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_packing_and_padding_give_the_same_loss_and_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    data = samples(10, model.config.vocab_size)
    one_loss, one = grads_after(model, pack(data, 10_000))  # one packed micro-batch
    many = pack(data, 40)  # several micro-batches of unequal token counts, accumulated
    assert len(many) >= 4 and len({b.num_targets for b in many}) > 1
    acc_loss, acc = grads_after(model, many)
    pad_loss, pad = grads_after(model, pack(data, 40, padded=True))
    assert acc_loss == pytest.approx(one_loss, rel=1e-5) and pad_loss == pytest.approx(one_loss, rel=1e-5)
    for name, g in one.items():
        torch.testing.assert_close(acc[name], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(pad[name], g, rtol=1e-4, atol=1e-6)


def test_schedule_warms_up_then_decays_to_zero():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == 1.0
    factors = [lr_factor(s, 10, 0) for s in range(11)]
    assert factors[0] == 1.0 and factors[10] == 0.0
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert lr_factor(5, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def _losses(out: Path) -> dict[tuple[int, str], float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): r[k] for r in records for k in ("train_loss", "eval_loss") if k in r}


def _options(model_dir: Path, data: Path, out: Path) -> dict:
    # several micro-batches per epoch (batch_tokens 64) and grad_accum 2: resume lands mid-epoch
    return dict(model=str(model_dir), data=str(data), method="full", lr=3e-3, max_steps=6, batch_tokens=64,
                grad_accum=2, save_every=2, eval_every=3, test_split=0.2, output=str(out), report=False)


def test_resume_reproduces_the_uninterrupted_loss_curve(tiny_model_dir, tmp_path, monkeypatch):
    from test_train_api import QA, write_qa

    import tunesmith.train.loop as loop
    from tunesmith.train.api import finetune

    data = write_qa(tmp_path / "qa.jsonl", QA * 2)
    finetune(**_options(tiny_model_dir, data, tmp_path / "straight"))
    real_step = loop.optimizer_step

    steps_done = {"n": 0}

    def crash_at_step_5(optimizer, scheduler, clip):
        if steps_done["n"] == 4:
            raise KeyboardInterrupt
        steps_done["n"] += 1
        return real_step(optimizer, scheduler, clip)

    monkeypatch.setattr(loop, "optimizer_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(**_options(tiny_model_dir, data, tmp_path / "resumed"))
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    finetune(**_options(tiny_model_dir, data, tmp_path / "resumed"), resume=True)
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and len([k for k in straight if k[1] == "train_loss"]) == 6
    for key, value in straight.items():
        assert abs(resumed[key] - value) <= 1e-5, key


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from test_train_api import write_qa

    import tunesmith.train.loop as loop
    from tunesmith.train.api import finetune
    from tunesmith.train.loop import TrainingDiverged

    real = loop.accumulate
    calls = {"n": 0}

    def nan_on_step_5(*args, **kwargs):
        calls["n"] += 1
        loss, metrics, n = real(*args, **kwargs)
        return (torch.tensor(float("nan")) if calls["n"] == 5 else loss), metrics, n

    monkeypatch.setattr(loop, "accumulate", nan_on_step_5)
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match=r"step 5: loss nan.*step-000004") as info:
        finetune(model=str(tiny_model_dir), data=str(write_qa(tmp_path / "qa.jsonl")), method="full",
                 max_steps=8, save_every=2, test_split=0.0, output=str(out), report=False)
    assert any("--lr" in line for line in info.value.problems)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not (out / "model.safetensors").exists()  # no diverged model is written as the result


def test_steps_from_epochs_and_the_data_position_walk(llama3_tokenizer):
    from tunesmith.train.checkpoint import TrainState
    from tunesmith.train.loop import DataPlan, step_groups, total_steps

    plan = DataPlan(samples(12, len(llama3_tokenizer)), batch_tokens=40, seed=1)
    per_epoch = len(plan.groups(0))
    assert total_steps(plan, 2, 1.5, None) == math.ceil(1.5 * math.ceil(per_epoch / 2))
    assert total_steps(plan, 2, 3.0, 7) == 7
    walk = step_groups(plan, 2, TrainState())
    seen = [next(walk) for _ in range(math.ceil(per_epoch / 2) + 1)]
    assert seen[-1][0] == 1 and seen[-2][1] == per_epoch  # epoch 0 ends, epoch 1 begins
    resumed = next(step_groups(plan, 2, TrainState(epoch=seen[2][0], batch_in_epoch=seen[2][1])))
    assert [b.input_ids.tolist() for b in resumed[3]] == [b.input_ids.tolist() for b in seen[3][3]]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tiny import with_method
    from tunesmith.model.fast import prepare_for_training

    data = pack(samples(4, 600), 10_000)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation for both
        model = with_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), "lora")
        prepare_for_training(model, device=CPU, batch_tokens=10_000, gradient_checkpointing=checkpointing)
        assert model.get_base_model().is_activation_checkpointing == checkpointing
        grads.append(grads_after(model, data)[1])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6)
