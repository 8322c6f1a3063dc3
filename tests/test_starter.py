"""The bundled starter model: complete on disk, loads offline with `transformers.pipeline`, answers in English.

A sanity test, not a quality claim: greedy replies to short instructions must be made of
English words, and the files the README promises must be there.
"""
from __future__ import annotations

import json
import re

import pytest

from tunesmith.model.load import STARTER_DIR

COMMON = {"a", "an", "the", "is", "of", "to", "and", "in", "or", "it", "that", "for", "are", "be", "with", "plus"}
STARTER_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "README.md", "defaults.yaml")


def test_starter_files_and_size() -> None:
    for name in STARTER_FILES:
        assert (STARTER_DIR / name).is_file(), name
    assert (STARTER_DIR / "model.safetensors").stat().st_size < 30 * 2**20
    config = json.loads((STARTER_DIR / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    gen = json.loads((STARTER_DIR / "generation_config.json").read_text())
    assert 4 in gen["eos_token_id"]  # <|eot_id|> ends a reply


def test_starter_tokenizer_specials_and_template() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STARTER_DIR)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert tok.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 4]
    assert tok.pad_token not in specials and tok.eos_token == "<|eot_id|>"
    assert 7000 <= len(tok) <= 9000
    out = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                  return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(trained) == "Hello<|eot_id|>"


@pytest.fixture(scope="module")
def chat_pipeline():
    from transformers import pipeline

    return pipeline("text-generation", model=str(STARTER_DIR), device="cpu")


@pytest.mark.parametrize("prompt", ["What does the word \"river\" mean?", "Define happiness."])
def test_starter_answers_in_english(chat_pipeline, prompt: str) -> None:
    out = chat_pipeline([{"role": "user", "content": prompt}], max_new_tokens=30, do_sample=False)
    reply = out[0]["generated_text"][-1]["content"]
    words = re.findall(r"[A-Za-z']+", reply.lower())
    assert len(words) >= 3, reply
    assert COMMON & set(words), reply
    assert len(" ".join(words)) >= 0.6 * len(reply.strip()), reply  # mostly letters, not symbol soup
