"""Config files from other tools and YAML's traps: numeric strings, null, aliases, unknown keys, FILE:LINE."""
from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.cli import build_parser, gather
from tunesmith.config import TrainConfig, build_config, read_options_file, train_config
from tunesmith.errors import UserError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(UserError) as err:
        read_options_file(path, TrainConfig)
    assert str(err.value).startswith(f"{path}: ")
    return err.value.problems


def test_yaml11_numeric_strings_are_numbers(tmp_path: Path) -> None:
    import yaml

    path = write(tmp_path, "lr: 1e-4\nepochs: '2'\nmax_steps: 5.0\nbatch_tokens: 4_096\n")
    assert yaml.safe_load(path.read_text())["lr"] == "1e-4"  # the trap: PyYAML reads it as text
    read = read_options_file(path, TrainConfig)
    config = train_config({"model": "m", **read.values})
    assert (config.loop.lr, config.loop.epochs, config.loop.max_steps, config.loop.batch_tokens) == (1e-4, 2.0, 5, 4096)


def test_hugging_face_names_map_and_say_so(tmp_path: Path) -> None:
    path = write(tmp_path, "learning_rate: 2e-5\nnum_train_epochs: 1\ngradient_accumulation_steps: 4\n"
                           "output_dir: out\nmax_steps: -1\nseed: 7\nwarmup_ratio: 0.1\nmax_seq_length: 512\n"
                           "lora_target_modules: [q_proj, v_proj]\n")
    read = read_options_file(path, TrainConfig)
    assert read.values == {"lr": 2e-5, "epochs": 1.0, "grad_accum": 4, "output": "out", "max_steps": None,
                           "seed": 7, "warmup_ratio": 0.1, "max_length": 512, "lora_targets": "q_proj,v_proj"}
    assert f"{path}:1: learning_rate read as lr (the Hugging Face TrainingArguments name)" in read.notices
    assert any(n.startswith(f"{path}:5: max_steps: -1 read as unset") for n in read.notices)
    assert read.where("grad_accum") == f"{path}:3"


def test_batch_size_in_samples_is_refused_with_the_token_conversion(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "max_length: 1024\nper_device_train_batch_size: 8\n"))
    assert found == [f"{tmp_path / 'run.yaml'}:2: per_device_train_batch_size: tunesmith batches by tokens, "
                     "not samples: write `batch_tokens: 8192` (8 samples of up to 1024 tokens; shorter samples "
                     "are packed, so more fit)"]


def test_every_problem_named_by_file_line_and_key_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "max_length: null\noutput: null\nsystem: no\nepochs: [1, 2]\nlearnin_rate: 3\n"
                           "bf16: true\nlr: fast\nseed: 1\nseed: 2\n")
    found = problems(path)
    expected = [
        (1, "max_length: null is not allowed (expected an integer; delete the key for the default, 2048)"),
        (2, "output: null is not allowed (expected text"),
        (3, "invalid value for system: False (expected text; YAML read it as a boolean: quote it)"),
        (4, "epochs: expected one value (a number), got a list: [1, 2]"),
        (5, "learnin_rate: unknown option (did you mean lr?)"),
        (6, "bf16: not a tunesmith option (tunesmith picks the dtype"),
        (7, "invalid value for lr: 'fast' (expected a number)"),
        (9, "seed: given twice (also on line 8)"),
    ]
    for line, text in expected:
        assert any(p.startswith(f"{path}:{line}: {text}") for p in found), (line, text, found)


def test_null_for_an_optional_field_means_unset(tmp_path: Path) -> None:
    read = read_options_file(write(tmp_path, "max_steps: null\ndata: null\nmodel: m\n"), TrainConfig)
    assert read.values == {"max_steps": None, "data": None, "model": "m"}


def test_range_errors_name_the_file_line_or_the_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "lr: 5\nmodel: m\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "-1"])
    values, sources = gather(TrainConfig, args)
    with pytest.raises(UserError, match=r"^--epochs: invalid value for epochs: -1.0"):
        train_config(values, sources)
    args = build_parser().parse_args(["train", "--config", str(path)])
    with pytest.raises(UserError, match=rf"^{path}:1: invalid value for lr: 5.0 \(allowed: 0 < lr < 1\)"):
        train_config(*gather(TrainConfig, args))


def test_python_api_gets_did_you_mean_and_coercion() -> None:
    with pytest.raises(UserError) as err:
        build_config(TrainConfig, {"learning_rate": 1e-4})
    assert err.value.problems == ["learning_rate: unknown (did you mean lr?)"]
    assert build_config(TrainConfig, {"lr": "3e-4", "model": "m"}).loop.lr == 3e-4
    with pytest.raises(UserError, match="max_length: null is not allowed"):
        build_config(TrainConfig, {"max_length": None})


def test_not_a_mapping_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"run\.yaml:1: expected a mapping"):
        read_options_file(write(tmp_path, "- lr: 1\n"), TrainConfig)
    path = tmp_path / "latin.yaml"
    path.write_bytes("system: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_options_file(path, TrainConfig)


def test_train_prints_where_each_setting_came_from(tmp_path: Path, tiny_model_dir: Path) -> None:
    import subprocess
    import sys

    path = write(tmp_path, "lr: 1e-4\n")
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "--config", str(path), "--method",
                           "lora", "--max-steps", "2", "--model", str(tiny_model_dir), "--data",
                           str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing.jsonl" in proc.stderr.splitlines()[-1]  # stops at the data
    lines = [" ".join(line.split()) for line in proc.stderr.splitlines()]
    assert f"lr 0.0001 (config {path}:1)" in lines
    assert "method lora (flag --method)" in lines and "max_steps 2 (flag --max-steps)" in lines
    assert "batch_tokens auto (default: the memory plan picks it on CUDA, 8192 on CPU)" in lines


def test_starter_defaults_are_named_and_never_beat_the_user() -> None:
    from tunesmith.config import starter_defaults
    from tunesmith.config_file import describe_settings

    values = {"method": "lora"}
    starter = starter_defaults(values)
    assert "lr" not in starter and "method" not in starter  # the starter's full-FT lr is not for LoRA
    config = train_config(values, {"method": "--method"})
    text = " ".join(describe_settings(config, {"method": "--method"}, set(starter)).split())
    assert "lr 0.0002 (default for lora x sft)" in text
    assert "batch_tokens 2048 (starter default)" in text and "model the bundled starter (default)" in text


def test_run_record_holds_the_values_used_and_their_sources() -> None:
    from tunesmith.config import run_record, starter_defaults
    from tunesmith.config_file import setting_origins

    starter = set(starter_defaults({}))
    config = train_config({})  # the zero-argument job: the starter's own defaults
    record = run_record(config, setting_origins(config, {}, starter))
    assert record["lr"] == 1e-3 and record["sources"]["lr"] == "starter default"
    assert record["sources"]["model"] == "default" and record["sources"]["epochs"] == "starter default"
    config = train_config({"model": "org/model", "objective": "orpo", "max_steps": 3})
    origins = setting_origins(config, {"max_steps": "run.yaml:4"}, set())
    record = run_record(config, origins)
    assert record["lr"] == 1e-5 and origins["lr"] == "default for lora x orpo"
    assert origins["max_steps"] == "config run.yaml:4" and origins["method"] == "default"
    assert origins["objective"] == "given"  # set, but by no flag or line known (a Python caller)


def test_a_recorded_sources_mapping_reads_back_as_a_record(tmp_path: Path) -> None:
    from tunesmith.config import read_options_file

    path = write(tmp_path, "lr: 0.001\nsources:\n  lr: starter default\n")
    read = read_options_file(path, TrainConfig)
    assert read.values == {"lr": 0.001} and not read.notices
