"""Model loading: the device/dtype policy and clear errors for names that are not models."""
from __future__ import annotations

import json

import pytest
import torch

from tunesmith.errors import UserError
from tunesmith.model.load import adapter_base, load_model, load_tokenizer, pick_device_dtype, resolve_model_name


def test_cpu_policy_is_float32() -> None:
    device, dtype = pick_device_dtype("cpu")
    assert device.type == "cpu" and dtype == torch.float32


def test_missing_local_path_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="no such directory"):
        resolve_model_name(str(tmp_path / "nope"))


def test_file_is_not_a_model(tmp_path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model_name(str(f))


def test_directory_without_config_is_not_a_model(tmp_path) -> None:
    with pytest.raises(UserError, match="not a model directory"):
        resolve_model_name(str(tmp_path))


def test_hub_ids_pass_through() -> None:
    assert resolve_model_name("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


def test_offline_hub_id_gives_advice() -> None:
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_tokenizer("tunesmith-test/definitely-not-cached")


def test_adapter_without_base_is_explained(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(UserError, match="base_model_name_or_path"):
        adapter_base(str(tmp_path))


def test_loads_local_model_in_policy_dtype(tiny_model_dir) -> None:
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.chat_template
