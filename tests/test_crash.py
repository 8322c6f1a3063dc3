"""Crash safety: kill -9 anywhere (mid-checkpoint included), a full disk, two runs on one --output.

The kill test runs `tunesmith train` in a subprocess whose `torch.save` sleeps after each
file (so a checkpoint write takes long enough to be killed inside), SIGKILLs it once in
the middle of a checkpoint write and once at a random moment, resumes each time, and
compares the loss curve with an uninterrupted run.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tunesmith.errors import UserError
from tunesmith.train.lock import LOCK_FILE, output_lock

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg", "SLOW_SAVE": "0.4"}
# `tunesmith train` with every torch.save followed by a pause: a checkpoint write takes >1 s.
SLOW_SAVE_DRIVER = """
import os, sys, time, torch
real_save = torch.save
def slow_save(*args, **kwargs):
    real_save(*args, **kwargs)
    time.sleep(float(os.environ["SLOW_SAVE"]))
torch.save = slow_save
from tunesmith.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def options(model_dir: Path, data: Path, out: Path) -> dict:
    return dict(model=str(model_dir), data=str(data), method="full", lr=3e-3, max_steps=8, batch_tokens=64,
                save_every=2, keep_checkpoints=2, test_split=0.2, output=str(out), report=False)


def flags(opts: dict) -> list[str]:
    out = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def losses(out: Path) -> dict[tuple[int, str], float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): r[k] for r in records for k in ("train_loss", "eval_loss") if k in r}


def start(opts: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_SAVE_DRIVER, *flags(opts), *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the moment to kill it:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to kill the run")
        time.sleep(0.02)


def kill_9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def complete(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step-*") if (p / "state.json").is_file())


def test_kill_9_anywhere_then_resume_reproduces_the_loss_curve(tiny_model_dir, tmp_path):
    from test_train_api import QA, write_qa

    from tunesmith.train.api import finetune

    data = write_qa(tmp_path / "qa.jsonl", QA * 3)
    straight = tmp_path / "straight"
    finetune(**options(tiny_model_dir, data, straight))
    out = tmp_path / "killed"
    opts = options(tiny_model_dir, data, out)
    ckpts = out / "checkpoints"

    # 1. killed inside the write of checkpoint 4 (checkpoint 2 complete)
    proc = start(opts)
    wait_for(lambda: complete(ckpts) == ["step-000002"] and any(ckpts.glob(".tmp-step-000004*")), proc)
    kill_9(proc)
    assert complete(ckpts) == ["step-000002"]  # the half-written step 4 is not a checkpoint

    # 2. resumed, then killed at a random moment after it got going
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    proc = start(opts, "--resume")
    wait_for(lambda: (out / "metrics.jsonl").is_file() and "step-000004" in complete(ckpts), proc)
    time.sleep(rng.uniform(0.0, 2.0))
    if proc.poll() is None:
        kill_9(proc)
    last = complete(ckpts)[-1]

    # 3. resumed to the end (saves at full speed)
    done = subprocess.run([sys.executable, "-c", SLOW_SAVE_DRIVER, *flags(opts), "--resume"],
                          env={**ENV, "SLOW_SAVE": "0"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed at step {int(last.removeprefix('step-'))}" in done.stderr or last == "step-000008", seed
    assert not list(ckpts.glob(".tmp-*")), "a killed save's temp dir was left behind"
    expected, got = losses(straight), losses(out)
    assert expected.keys() == got.keys(), seed
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), (key, seed)
    assert not (out / LOCK_FILE).exists()


def test_disk_full_while_saving_keeps_the_last_checkpoint_and_the_dir_resumable(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    from test_train_api import QA, write_qa
    from transformers import pipeline

    from tunesmith.train.api import finetune

    data = write_qa(tmp_path / "qa.jsonl", QA * 3)
    out = tmp_path / "out"
    real_save = torch.save

    def disk_full_at_step_4(obj, path, *args, **kwargs):
        if "step-000004" in str(path):
            Path(path).write_bytes(b"\0" * 10)  # part of the file made it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    with pytest.raises(UserError) as err:
        finetune(**options(tiny_model_dir, data, out))
    assert "could not write the checkpoint (No space left on device)" in str(err.value)
    assert f"{out / 'checkpoints' / 'step-000002'}, is intact: --resume continues from it" in err.value.problems[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert not (out / LOCK_FILE).exists()
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    finetune(**options(tiny_model_dir, data, out), resume=True)
    generator = pipeline("text-generation", model=str(out))
    assert isinstance(generator("Say hello", max_new_tokens=3)[0]["generated_text"], str)


def test_a_second_run_on_the_same_output_refuses_naming_the_first(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):  # this process is "the first run"
        proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "--model", str(tiny_model_dir),
                               "--max-steps", "1", "--output", str(out)], env=ENV, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"tunesmith: {out}: another tunesmith run is writing here (PID {os.getpid()})" in proc.stderr
        assert "Traceback" not in proc.stderr
        with pytest.raises(UserError, match=f"PID {os.getpid()}"):  # also within one process
            with output_lock(out):
                pass
    assert not (out / LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_run_is_taken_over_and_said_once(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{dead.stdout.strip()} somehost\n")
    with output_lock(out):
        assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    err = capsys.readouterr().err
    assert err.count("taking over the lock") == 1 and f"PID {dead.stdout.strip()}" in err


def test_only_rank_0_of_a_torchrun_job_takes_the_lock(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with output_lock(out):
        monkeypatch.setenv("RANK", "1")  # another rank of the same job
        with output_lock(out):
            pass
