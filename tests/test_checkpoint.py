"""Checkpoints: exact round trip, pruning, and atomic writes (a crash mid-save leaves the previous one)."""
from __future__ import annotations

import dataclasses
import errno
import os
import random
from pathlib import Path

import pytest
import torch

from tunesmith.errors import UserError
from tunesmith.train.checkpoint import TrainState, checkpoint_dirs, load_checkpoint, save_checkpoint
from tunesmith.train.schedule import cosine_schedule


def tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = cosine_schedule(optimizer, total_steps=10)
    return model, optimizer, scheduler


def take_step(model, optimizer, scheduler) -> None:
    loss = model(torch.randn(3, 4)).square().sum()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_round_trip_restores_weights_optimizer_schedule_rng_and_position(tmp_path):
    model, optimizer, scheduler = tiny_setup()
    for _ in range(3):
        take_step(model, optimizer, scheduler)
    state = TrainState(step=3, epoch=1, batch_in_epoch=2, tokens=99, best_eval_loss=1.5, history=[{"step": 3}])
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, state, keep=2)
    expected_draw = (torch.rand(1).item(), random.random())
    model2, optimizer2, scheduler2 = tiny_setup(seed=1)  # different weights until loaded
    restored = load_checkpoint(path, model2, optimizer2, scheduler2)
    assert restored == dataclasses.replace(state, checkpoint=str(path))  # it names where it came from
    assert (torch.rand(1).item(), random.random()) == expected_draw
    torch.manual_seed(123)  # the same input for two continuations from the same checkpoint
    take_step(model2, optimizer2, scheduler2)
    assert scheduler2.last_epoch == 4
    model3, optimizer3, scheduler3 = tiny_setup(seed=2)
    load_checkpoint(path, model3, optimizer3, scheduler3)
    torch.manual_seed(123)
    take_step(model3, optimizer3, scheduler3)
    for a, b in zip(model2.parameters(), model3.parameters()):
        assert torch.equal(a, b)


def test_keeps_only_the_newest(tmp_path):
    model, optimizer, scheduler = tiny_setup()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=step), keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000004", "step-000006"]


def test_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, optimizer, scheduler = tiny_setup()
    take_step(model, optimizer, scheduler)
    good = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=1), keep=1)
    saved = {n: p.clone() for n, p in model.named_parameters()}
    take_step(model, optimizer, scheduler)

    real_save = torch.save

    def disk_full_on_scheduler(obj, path, *args, **kwargs):
        if str(path).endswith("scheduler.pt"):
            Path(path).write_bytes(b"half a fi")  # the disk fills up part way through the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_scheduler)
    with pytest.raises(UserError) as err:
        save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=2), keep=1)
    assert str(err.value) == f"{tmp_path / 'step-000002'}: could not write the checkpoint (No space left on device)"
    assert err.value.problems == [f"the last complete checkpoint, {good}, is intact: --resume continues from it; "
                                  "free disk space (or lower --keep-checkpoints)"]
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == [good.name]  # no half-written step-2, no temp left
    model2, optimizer2, scheduler2 = tiny_setup(seed=5)
    assert load_checkpoint(good, model2, optimizer2, scheduler2).step == 1
    for name, p in model2.named_parameters():
        assert torch.equal(p, saved[name])


def test_a_half_written_directory_is_never_taken_for_a_checkpoint(tmp_path):
    (tmp_path / ".tmp-step-000008-1").mkdir()
    (tmp_path / "step-000009").mkdir()  # no state.json: incomplete
    assert checkpoint_dirs(tmp_path) == []
