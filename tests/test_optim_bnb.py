"""--optim: bitsandbytes AdamW variants for every method; checkpoints resume with each."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tunesmith.config import OPTIMIZERS, train_config
from tunesmith.errors import UserError
from tunesmith.train.optim import BNB_OPTIMIZERS, check_optimizer_installed, make_optimizer

bnb = pytest.importorskip("bitsandbytes")


def test_the_flag_names_and_the_optimizers_agree():
    assert set(OPTIMIZERS) == {"adamw", *BNB_OPTIMIZERS}
    assert train_config({"model": "m", "optim": "adamw-8bit"}).loop.optim == "adamw-8bit"
    with pytest.raises(UserError, match="invalid value for optim"):
        train_config({"model": "m", "optim": "sgd"})


@pytest.mark.parametrize("name", sorted(BNB_OPTIMIZERS))
def test_each_bitsandbytes_optimizer_is_built_and_keeps_its_state_bits(name):
    p = torch.nn.Parameter(torch.randn(128, 64))  # >= 4096 elements: bitsandbytes' 8-bit threshold
    opt = make_optimizer([p], lr=1e-2, optim=name)
    assert type(opt).__name__ == BNB_OPTIMIZERS[name]
    before = p.detach().clone()
    (p ** 2).sum().backward()
    opt.step()
    assert not torch.equal(p.detach(), before)
    want = torch.float32 if name.endswith("32bit") else torch.uint8
    assert opt.state[p]["state1"].dtype == want


def test_a_bitsandbytes_optimizer_without_bitsandbytes_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(UserError, match="--optim adamw-8bit needs bitsandbytes") as info:
        check_optimizer_installed("adamw-8bit")
    assert "tunesmith[qlora]" in info.value.problems[0]
    check_optimizer_installed("adamw")  # the default needs nothing


@pytest.mark.parametrize("method, optim", [("full", "adamw-8bit"), ("lora", "paged-adamw-32bit"),
                                           ("qlora", "paged-adamw-8bit")])
def test_resume_reproduces_the_run_with_each_optimizer(tiny_model_dir, tmp_path, monkeypatch, method, optim,
                                                       one_thread):
    from test_loop import _losses
    from test_train_api import QA, write_qa

    import tunesmith.train.loop as loop
    from tunesmith.train.api import finetune

    data = write_qa(tmp_path / "qa.jsonl", QA * 2)
    options = dict(model=str(tiny_model_dir), data=str(data), method=method, optim=optim, lr=3e-3, max_steps=4,
                   batch_tokens=64, save_every=2, test_split=0.0, report=False)
    finetune(**options, output=str(tmp_path / "straight"))
    real_step, done = loop.optimizer_step, {"n": 0}

    def crash_at_step_3(optimizer, scheduler, clip):
        if done["n"] == 2:
            raise KeyboardInterrupt
        done["n"] += 1
        return real_step(optimizer, scheduler, clip)

    monkeypatch.setattr(loop, "optimizer_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune(**options, output=str(tmp_path / "resumed"))
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    finetune(**options, output=str(tmp_path / "resumed"), resume=True)
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and len(straight) == 4
    for key, value in straight.items():
        assert abs(resumed[key] - value) <= 1e-5, key
