"""`tunesmith push` and the model card: tested against huggingface_hub with HfApi's two network
methods patched at the boundary. The card comes from a real (tiny) run's files and parses with
huggingface_hub's ModelCard; the uploaded files are asserted; the token never shows in output."""
from __future__ import annotations

import logging

import pytest

from export_helpers import SYSTEM, tiny_lora_run

TOKEN = "hf_tunesmithTESTtoken0123456789abcdef"


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    return tiny_lora_run(tiny_model_dir, tmp_path_factory.mktemp("push"), report=True)


@pytest.fixture
def hub(monkeypatch):
    """Record what would be sent; the token is read from the environment like a user's would be."""
    from huggingface_hub import HfApi, constants

    calls: dict = {"repos": [], "commits": []}

    def create_repo(self, repo_id, **kwargs):
        calls["repos"].append((repo_id, kwargs, self.token))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = src if isinstance(src, bytes) else open(src, "rb").read()
        calls["commits"].append((repo_id, files, kwargs))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return calls


def push(*args: str) -> int:
    from tunesmith.cli import main

    return main(["push", *args])


def test_push_uploads_adapter_run_files_and_card(run_dir, hub, capsys, caplog):
    from huggingface_hub import ModelCard

    caplog.set_level(logging.DEBUG)
    assert push(str(run_dir), "--repo", "someone/tiny-tuned", "--private") == 0
    out = capsys.readouterr()
    assert "pushed: https://huggingface.co/someone/tiny-tuned" in out.out
    (repo, kwargs, token), = hub["repos"]
    assert repo == "someone/tiny-tuned" and kwargs["private"] is True and token == TOKEN
    (_, files, _), = hub["commits"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "generation_config.json", "config.yaml", "summary.json", "report.md", "loss.png", "README.md"):
        assert name in files, name
    assert not {"eval.jsonl", "report.html"} & set(files) and not any("/" in n for n in files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and "lora" in card.data.tags and card.data.pipeline_tag == "text-generation"
    assert TOKEN not in out.out + out.err + caplog.text + files["README.md"].decode()


def test_card_states_data_method_template_eval_and_usage(run_dir):
    from huggingface_hub import ModelCard

    from tunesmith.export.card import model_card
    from tunesmith.export.source import load_source

    source = load_source(str(run_dir))
    source.base_model = "meta-llama/Llama-3.2-1B-Instruct"  # as when the run started from a hub model
    source.run["data"] = "tatsu-lab/alpaca"
    text = model_card(source, "someone/tiny-tuned", exported=["gguf", "ollama"])
    meta = ModelCard(text).data
    assert meta.base_model == "meta-llama/Llama-3.2-1B-Instruct" and meta.datasets == ["tatsu-lab/alpaca"]
    assert meta.license == "other" and {"tunesmith", "lora", "gguf", "ollama"} <= set(meta.tags)
    body = text.split("---", 2)[2]
    assert f"- tokens trained on: {int(source.summary['tokens']):,} in 2 steps" in body
    assert "| lora_r | 16 |" in body and "| max_steps | 2 |" in body and "| method | lora |" in body
    assert source.tokenizer.chat_template in body and "`<|eot_id|>` (id 4)" in body
    assert f"Training system prompt: `{SYSTEM}`" in body
    table = [line for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("|")]
    assert "\n".join(table) in body and "| loss on reply tokens |" in body
    assert 'pipeline("text-generation", model="someone/tiny-tuned")' in body
    assert "AutoPeftModelForCausalLM" in body and "llama-cli -hf someone/tiny-tuned" in body
    assert "ollama create" in body


def test_card_counts_samples_of_a_local_file(run_dir):
    from tunesmith.export.card import model_card
    from tunesmith.export.source import load_source

    text = model_card(load_source(str(run_dir)), "someone/x")
    assert "- samples: 6" in text and "- held out for evaluation: 6" in text and "(format: messages)" in text
    assert "base_model" not in text.split("---", 2)[1]  # a local base is not a hub id


def test_push_merged_uploads_full_weights_and_exports(run_dir, hub, capsys):
    from huggingface_hub import ModelCard

    from tunesmith.export.api import export_model

    export_model(str(run_dir), to="ollama", quant="q8_0")
    assert push(str(run_dir), "--repo", "someone/tiny-merged", "--merged") == 0
    (_, files, _), = hub["commits"]
    assert "model.safetensors" in files and "adapter_model.safetensors" not in files
    assert "run-q8_0.gguf" in files and "Modelfile" in files and "config.yaml" in files
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and {"gguf", "ollama"} <= set(card.data.tags)
    assert TOKEN not in capsys.readouterr().out


def test_push_without_token_exits_2_saying_how_to_log_in(run_dir, hub, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert push(str(run_dir), "--repo", "someone/x") == 2
    err = capsys.readouterr().err
    assert "needs a Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err
    assert not hub["repos"] and "Traceback" not in err


def test_push_offline_exits_2(run_dir, hub, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert push(str(run_dir), "--repo", "someone/x") == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not hub["repos"]


def test_push_needs_a_repo(run_dir, capsys):
    assert push(str(run_dir)) == 2
    assert "--repo USER/NAME is required" in capsys.readouterr().err
    assert push(str(run_dir), "--repo", "no-slash") == 2
