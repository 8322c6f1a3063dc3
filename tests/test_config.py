"""Config: YAML < flags precedence, validation messages, starter preset, flags derived from fields."""
from __future__ import annotations

import pytest

from tunesmith.cli import build_parser, gather
from tunesmith.config import (LoopOptions, TrainConfig, attribute_docs, build_config, load_yaml, options_of,
                              to_flat_dict, train_config)
from tunesmith.errors import UserError


def test_every_option_has_help_and_a_unique_name() -> None:
    opts = options_of(TrainConfig)
    names = [o.name for o in opts]
    assert len(names) == len(set(names)), "option names must be unique across groups (YAML is flat)"
    assert all(o.help for o in opts), [o.name for o in opts if not o.help]
    assert attribute_docs(LoopOptions)["lr"].startswith("Peak learning rate")


def test_yaml_then_flags(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.001\nepochs: 2\nmax-length: 512\nmodel: some/model\n")
    args = build_parser().parse_args(["train", "--config", str(cfg), "--epochs", "5"])
    config = train_config(gather(TrainConfig, args)[0])
    assert config.loop.epochs == 5.0  # the flag wins
    assert config.loop.lr == 0.001  # the YAML fills in
    assert config.data.max_length == 512  # dashes accepted in YAML keys
    assert config.model.model == "some/model"


@pytest.mark.parametrize("values, field", [
    ({"lr": 5.0}, "lr"),
    ({"method": "magic"}, "method"),
    ({"test_split": 1.5}, "test_split"),
    ({"batch_tokens": 0}, "batch_tokens"),
    ({"format": "xml"}, "format"),
    ({"epochs": "three"}, "epochs"),
])
def test_validation_names_field_and_value(values, field) -> None:
    with pytest.raises(UserError) as err:
        build_config(TrainConfig, values)
    assert field in str(err.value)


def test_unknown_key_is_refused() -> None:
    with pytest.raises(UserError, match="unknown option"):
        build_config(TrainConfig, {"learning_rate": 1e-4})


def test_bad_yaml_points_at_line(tmp_path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lr: 0.1\nepochs: [1,\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+"):
        load_yaml(cfg)


def test_round_trip_flat_dict() -> None:
    config = build_config(TrainConfig, {"lr": 3e-4, "method": "full", "model": "m"})
    assert build_config(TrainConfig, to_flat_dict(config)) == config


def test_method_default_learning_rates() -> None:
    assert build_config(TrainConfig, {"method": "full", "model": "m"}).peak_lr() == 1e-5
    assert build_config(TrainConfig, {"method": "lora", "model": "m"}).peak_lr() == 2e-4


def test_starter_preset_only_without_model(tmp_path, monkeypatch) -> None:
    import tunesmith.config as config_mod

    preset = tmp_path / "defaults.yaml"
    preset.write_text("epochs: 7\nlr: 0.0003\n")
    monkeypatch.setattr(config_mod, "STARTER_DEFAULTS", preset)
    assert train_config({}).loop.epochs == 7.0
    assert train_config({"epochs": 1}).loop.epochs == 1.0  # the user wins over the preset
    assert train_config({"model": "x"}).loop.epochs == LoopOptions().epochs  # preset is for the starter only


def test_starter_recipes_apply_only_to_their_pair_and_never_over_user_values(tmp_path, monkeypatch) -> None:
    import tunesmith.config as config_mod

    preset = tmp_path / "defaults.yaml"
    preset.write_text("method: full\nobjective: sft\nlr: 0.001\nrecipes:\n  dpo/full: {lr: 5.0e-5, test_split: 0.2}\n")
    monkeypatch.setattr(config_mod, "STARTER_DEFAULTS", preset)
    dpo = train_config({"objective": "dpo"})
    assert dpo.peak_lr() == 5e-5 and dpo.data.test_split == 0.2
    assert train_config({"objective": "dpo", "lr": 1e-6}).peak_lr() == 1e-6  # the user wins
    assert train_config({"objective": "dpo", "method": "lora"}).peak_lr() == 5e-6  # no starter value: the objective's
    assert train_config({}).peak_lr() == 1e-3 and train_config({"model": "m", "objective": "dpo", "method": "full"}).peak_lr() == 5e-7
