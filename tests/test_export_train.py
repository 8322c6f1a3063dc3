"""`train --export FORMAT`: one option in OutputOptions, one call at the end of `finetune`."""
from __future__ import annotations

import pytest

from tunesmith.errors import UserError


def test_export_option_is_validated():
    from tunesmith.config import OutputOptions, train_config

    assert train_config({"export": "ollama"}).output.export == "ollama"
    with pytest.raises(UserError, match="export"):
        OutputOptions(export="zip")


def test_finetune_exports_at_the_end(tiny_model_dir, tmp_path, capsys, one_thread):
    from test_train_api import write_qa

    from export_helpers import gguf_fields
    from tunesmith.train.api import finetune

    data = write_qa(tmp_path / "qa.jsonl")
    out = finetune(model=str(tiny_model_dir), data=str(data), method="lora", max_steps=1, test_split=0.0,
                   output=str(tmp_path / "run"), report=False, export="gguf").output_dir
    gguf = out / "export-gguf" / "run-q8_0.gguf"
    assert gguf.is_file() and gguf_fields(gguf)["general.file_type"] == 7  # MOSTLY_Q8_0
    assert f"wrote {gguf}" in capsys.readouterr().err
