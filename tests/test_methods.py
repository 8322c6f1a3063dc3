"""The method seam: --method (parameter set) x --objective from one registry; impossible combinations refused."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tunesmith.config import train_config
from tunesmith.errors import UserError
from tunesmith.methods import OBJECTIVES, PARAMETER_SETS, recipe


def test_registry_holds_what_is_built_and_each_entry_declares_its_parts():
    assert set(PARAMETER_SETS) >= {"full", "lora"} and set(OBJECTIVES) >= {"sft", "pretrain"}
    for objective in OBJECTIVES.values():
        assert objective.sample_kind in ("sequence", "pair") and objective.data_kinds
        assert 0 < objective.lr_full < 1 and 0 < objective.lr_adapter < 1 and callable(objective.make_loss)
    for params in PARAMETER_SETS.values():
        assert callable(params.wrap) and isinstance(params.adapter, bool)


def test_default_lr_comes_from_the_objective_and_the_parameter_set():
    assert train_config({"model": "m", "method": "full"}).peak_lr() == OBJECTIVES["sft"].lr_full == 1e-5
    assert train_config({"model": "m", "method": "lora"}).peak_lr() == OBJECTIVES["sft"].lr_adapter == 2e-4
    assert train_config({"model": "m", "method": "lora", "lr": 3e-4}).peak_lr() == 3e-4


def test_the_starter_defaults_never_override_what_the_user_typed():
    assert train_config({}).peak_lr() == 1e-3  # the starter's own tuned default (full, sft)
    lora = train_config({"method": "lora"})
    assert lora.method.method == "lora" and lora.peak_lr() == 2e-4  # not the starter's full-FT rate
    assert train_config({"method": "lora", "lr": 5e-4}).peak_lr() == 5e-4


@pytest.mark.parametrize("values, message", [
    ({"method": "full", "merge": True}, "no adapter to merge"),
    ({"method": "qlora_typo"}, "invalid value for method"),
    ({"objective": "dpo_typo"}, "invalid value for objective"),
])
def test_impossible_or_unknown_combinations_are_refused_in_one_line(values, message):
    with pytest.raises(UserError, match=message):
        train_config({"model": "m", **values})


def test_data_the_objective_cannot_train_on_is_refused_naming_the_fix():
    with pytest.raises(UserError, match="preference data cannot train with --objective sft") as info:
        recipe("lora", "sft").check_data({"chat", "preference"}, "prefs.jsonl")
    assert info.value.problems and info.value.problems[0].startswith("fix:")
    recipe("lora", "pretrain").check_data({"text", "chat"}, "corpus.txt")  # accepted


def test_pretrain_trains_every_token_through_the_same_loop(tiny_model_dir, tmp_path):
    from test_train_api import write_qa

    from tunesmith.train.api import finetune

    data = write_qa(tmp_path / "qa.jsonl")
    runs = {}
    for objective in ("sft", "pretrain"):
        out = tmp_path / objective
        finetune(model=str(tiny_model_dir), data=str(data), method="lora", objective=objective, max_steps=1,
                 test_split=0.0, output=str(out), report=False)
        runs[objective] = json.loads((out / "summary.json").read_text())
        assert (out / "adapter_model.safetensors").is_file()
    assert runs["pretrain"]["tokens"] == runs["sft"]["tokens"]  # the same samples ...
    sft_trained = _trained_tokens(tiny_model_dir, data, False, tmp_path)
    assert _trained_tokens(tiny_model_dir, data, True, tmp_path) > 2 * sft_trained > 0  # ... but every token is a target


def _trained_tokens(model_dir, data, all_tokens: bool, tmp_path) -> int:
    from transformers import AutoTokenizer

    from tunesmith.config import DataOptions
    from tunesmith.data.prepare import prepare_data

    tok = AutoTokenizer.from_pretrained(model_dir)
    prepared = prepare_data(DataOptions(data=str(data), test_split=0.0, train_on_prompt=all_tokens), tok,
                            cache_dir=tmp_path / "cache", log=lambda _: None)
    return sum(s.num_trained for s in prepared.train)


def test_help_lists_only_what_is_built():
    out = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "--help"], capture_output=True,
                         text=True, timeout=60).stdout
    assert "--objective" in out and "--method" in out
    for planned in ("qlora", "dpo", "orpo"):
        if planned not in PARAMETER_SETS and planned not in OBJECTIVES:
            assert planned not in out, planned
