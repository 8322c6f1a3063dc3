"""Two processes (torchrun, gloo, CPU) train like one: the same per-step losses, the same saved
model; sharded checkpoints resume on two processes or on one; a killed rank stops the run.

Process start dominates, so one torchrun launch (tests/dist_worker.py) runs every two-process
scenario, and the one-process references run here in the test process.
"""
from __future__ import annotations

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

from dist_common import COMPILED_SCENARIOS, PREFERENCE_SCENARIOS, RUN, SCENARIOS
from tiny import WORDS

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}


def write_chats(path: Path, n: int = 40, seed: int = 0) -> Path:
    """Single-turn chats of 2-12 word questions and 1-20 word answers (so packing mixes lengths)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def write_pairs(path: Path, n: int = 24, seed: int = 1) -> Path:
    """prompt/chosen/rejected rows of words: chosen repeats the prompt's first word, rejected does not."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 8))]
            chosen = " ".join([words[0]] * rng.randint(2, 6))
            rejected = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"prompt": " ".join(words), "chosen": chosen, "rejected": rejected + " no"}) + "\n")
    return path


def torchrun(*args: str) -> list[str]:
    """The torchrun command line for two local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Path:
    """Every two-process scenario (one launch), then the one-process references and the 2 -> 1 resume."""
    from tunesmith.train.api import finetune

    root = tmp_path_factory.mktemp("dist")
    data, pairs = write_chats(root / "chats.jsonl"), write_pairs(root / "pairs.jsonl")
    done = subprocess.run(torchrun(str(HERE / "dist_worker.py"), str(root), str(tiny_model_dir), str(data), str(pairs)),
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("full", "lora"):
            finetune(model=str(tiny_model_dir), data=str(data), output=str(root / f"one-{method}"), method=method, **RUN)
        for name, options in PREFERENCE_SCENARIOS.items():
            options = {k: v for k, v in options.items() if k != "parallel"}
            finetune(model=str(tiny_model_dir), data=str(pairs), output=str(root / f"one-{name}"), **{**RUN, **options})
        finetune(model=str(tiny_model_dir), data=str(data), output=str(root / "resumed-1"), resume=True, **RUN,
                 **SCENARIOS["fsdp-full"])
    finally:
        torch.set_num_threads(threads)
    return root


def curve(directory: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) records of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return ([(r["step"], r["train_loss"]) for r in records if "train_loss" in r],
            [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r])


def assert_same_curve(run: Path, reference: Path, rel: float = 1e-5) -> None:
    """Same steps, losses equal within fp32 tolerance."""
    (train, evals), (ref_train, ref_evals) = curve(run), curve(reference)
    assert [s for s, _ in train] == [s for s, _ in ref_train] == list(range(1, RUN["max_steps"] + 1))
    assert [s for s, _ in evals] == [s for s, _ in ref_evals] == [0, RUN["max_steps"]]
    assert [v for _, v in train] == pytest.approx([v for _, v in ref_train], rel=rel, abs=1e-5)
    assert [v for _, v in evals] == pytest.approx([v for _, v in ref_evals], rel=rel, abs=1e-5)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """The saved weights of an output directory (full model or adapter)."""
    from safetensors.torch import load_file

    name = "model.safetensors" if (directory / "model.safetensors").is_file() else "adapter_model.safetensors"
    return load_file(str(directory / name))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_give_the_loss_curve_and_model_of_one(runs, name):
    reference = runs / f"one-{SCENARIOS[name]['method']}"
    assert_same_curve(runs / name, reference)
    got, expected = weights(runs / name), weights(reference)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5)
    assert json.loads((runs / name / "summary.json").read_text())["steps"] == RUN["max_steps"]


@pytest.mark.parametrize("name", list(COMPILED_SCENARIOS))
def test_compiled_grouped_lora_layers_on_two_processes_train_like_plain_lora_on_one(runs, name):
    """The CUDA fast path's layers (fused LoRA nodes, decoder layers compiled, the calls that share
    an input grouped) under FSDP2: the loss curve and adapter of the plain one-process run.
    Compiled for real on both ranks (no silent eager fallback), every graph's 7 calls grouped."""
    assert_same_curve(runs / name, runs / "one-lora", rel=1e-4)
    got, expected = weights(runs / name), weights(runs / "one-lora")
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-5)
    for rank in (0, 1):
        record = json.loads((runs / f"{name}-compile-{rank}.json").read_text())
        assert record["graphs"] >= 1 and record["breaks"] == 0, record
        assert record["rewritten"] and set(record["rewritten"]) == {7}, record


@pytest.mark.parametrize("name", list(PREFERENCE_SCENARIOS))
def test_dpo_on_two_processes_trains_like_one_process(runs, name):
    """Full DPO under FSDP2 (the ranks score half the pairs each before sharding, or each keeps a live
    frozen copy) and LoRA DPO under DDP (the adapter off as the reference): losses, rewards and
    weights match one process."""
    assert_same_curve(runs / name, runs / f"one-{name}")
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (runs / f"one-{name}" / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in records if "train_loss" in r][0]
    assert first["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy IS the reference at step 1
    for key in ("reward_accuracy", "margin"):
        # step 1's margins are rounding noise around 0 (policy == reference), so its accuracy (a share of
        # margins > 0) is the sign of that noise, which any change of batching flips: compared from step 2
        skip = 1 if key == "reward_accuracy" else 0
        assert [r.get(key) for r in records if key in r][skip:] == pytest.approx(
            [r.get(key) for r in ref if key in r][skip:], rel=1e-4, abs=1e-5)
    got, expected = weights(runs / name), weights(runs / f"one-{name}")
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5)
    cache = list((runs / name / ".cache").rglob("reference-*.npz"))
    options = PREFERENCE_SCENARIOS[name]
    cached = options["method"] == "full" and options.get("reference") != "live"
    assert len(cache) == (1 if cached else 0)  # the cached pass: written once, by rank 0


def test_checkpoints_are_sharded_and_the_gathered_model_loads_with_pipeline(runs):
    from transformers import pipeline

    checkpoint = runs / "fsdp-full" / "checkpoints" / "step-000006"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert {"rng-0.pt", "rng-1.pt", "scheduler.pt", "state.json", ".metadata"} <= {p.name for p in checkpoint.iterdir()}
    generator = pipeline("text-generation", model=str(runs / "fsdp-full"))
    assert isinstance(generator("hello", max_new_tokens=3, do_sample=False)[0]["generated_text"], str)


def test_resume_on_two_processes_reproduces_the_uninterrupted_curve(runs):
    assert_same_curve(runs / "resumed-2", runs / "fsdp-full")
    for key, value in weights(runs / "fsdp-full").items():
        torch.testing.assert_close(weights(runs / "resumed-2")[key], value, rtol=1e-5, atol=1e-6)


def test_a_two_process_checkpoint_resumes_on_one(runs):
    assert_same_curve(runs / "resumed-1", runs / "one-full")


def test_each_step_is_shared_out_by_tokens_and_ranks_stay_in_step():
    from tunesmith.data.packing import group_by_budget, split_step

    rng = random.Random(1)
    lengths = [rng.randint(3, 60) for _ in range(50)]
    step = group_by_budget(lengths, 100)[:4]
    assert split_step(step, lengths, 1, 100) == [step]  # one process: unchanged
    for world in (2, 3, 8):
        shares = split_step(step, lengths, world, 100)
        assert len({len(s) for s in shares}) == 1  # as many micro-batches (placeholders: []) on every rank
        taken = sorted(i for share in shares for group in share for i in group)
        assert taken == sorted(i for group in step for i in group)  # every sample once, nothing more
        assert all(sum(lengths[i] for i in g) <= 100 or len(g) == 1 for s in shares for g in s)
        loads = [sum(lengths[i] for g in s for i in g) for s in shares]
        assert max(loads) - min(loads) <= max(lengths)  # balanced by tokens


def rank_pid(rank: int, marker: str) -> int | None:
    """The pid of the torchrun worker with this rank whose command line holds `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"|".join(environ) and marker.encode() in cmdline:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_the_run_on_every_rank_with_the_last_checkpoint(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tunesmith", "train", "--gpus", "2", "--model", str(tiny_model_dir),
               "--data", str(write_chats(tmp_path / "chats.jsonl")), "--method", "full", "--max-steps", "100000",
               "--save-every", "2", "--batch-tokens", "64", "--test-split", "0", "--no-report", "--output", str(out)]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-000002" / "state.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        pid = rank_pid(1, str(out))
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert time.monotonic() - killed < 60
    assert "tunesmith: rank 0: stopped" in stderr, stderr[-3000:]
    assert f"the last good checkpoint is {out / 'checkpoints'}" in stderr


def test_failure_messages_name_the_rank_and_the_last_checkpoint(tmp_path, capsys):
    from tunesmith.errors import UserError
    from tunesmith.train.distributed import Dist, PeerFailed, choose_wrapper, failure_guard
    from tunesmith.train.loop import TrainingDiverged

    (tmp_path / "step-000004").mkdir()
    (tmp_path / "step-000004" / "state.json").write_text("{}")
    rank1 = Dist(rank=1, world=2)
    with pytest.raises(UserError) as own:
        with failure_guard(rank1, tmp_path):
            raise UserError("out of GPU memory", ["fix: lower --batch-tokens"])
    assert own.value.lines() == ["rank 1 of 2 failed: out of GPU memory", "fix: lower --batch-tokens",
                                 f"the run stops on all ranks; the last good checkpoint is {tmp_path / 'step-000004'} "
                                 "(`--resume` continues from it)"]
    with pytest.raises(PeerFailed) as peer:  # a collective that lost its peer: stop, say so, exit 1
        with failure_guard(rank1, tmp_path):
            raise RuntimeError("[pair.cc:537] Read error [127.0.0.1]:9650: Connection reset by peer")
    assert peer.value.code == 1 and "tunesmith: rank 1: stopped: RuntimeError" in capsys.readouterr().err
    with pytest.raises(PeerFailed):  # every rank sees the same diverged loss: rank 0 alone reports it
        with failure_guard(rank1, tmp_path):
            raise TrainingDiverged("training diverged at step 5")
    with pytest.raises(TrainingDiverged):
        with failure_guard(Dist(rank=0, world=2), tmp_path):
            raise TrainingDiverged("training diverged at step 5")
    assert capsys.readouterr().err == ""
    assert (choose_wrapper("auto", adapter=True), choose_wrapper("auto", adapter=False)) == ("ddp", "fsdp")
    assert choose_wrapper("ddp", adapter=False) == "ddp"
