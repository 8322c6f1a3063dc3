"""Chat templates: which one `auto` picks, built-ins installed on the tokenizer, end-of-turn ids."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tiny
from transformers import AutoTokenizer

from tunesmith.data.templates import BUILTIN, Renderer, choose_template, end_of_turn_ids
from tunesmith.errors import UserError

CHAT = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]


def fresh(tokenizer):  # noqa: ANN001, ANN201 - fixtures are session-wide; templates mutate the tokenizer
    """A private copy of a session fixture."""
    return copy.deepcopy(tokenizer)


def test_auto_keeps_the_tokenizers_own_template(llama3_tokenizer, chatml_tokenizer) -> None:
    for tok, eot in ((fresh(llama3_tokenizer), "<|eot_id|>"), (fresh(chatml_tokenizer), "<|im_end|>")):
        own = tok.chat_template
        assert choose_template(tok) == "tokenizer" and tok.chat_template == own
        assert tok.convert_ids_to_tokens(end_of_turn_ids(tok)) == [eot]


def test_auto_on_a_base_tokenizer_needs_no_new_tokens(base_tokenizer) -> None:
    tok = fresh(base_tokenizer)
    size = len(tok)
    assert choose_template(tok) == "zephyr"
    assert len(tok) == size and tok.chat_template == BUILTIN["zephyr"][0]
    assert end_of_turn_ids(tok) == [tok.eos_token_id]
    text = Renderer(tok).render(CHAT)
    assert text == "<s><|system|>\nSys</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n"


def test_auto_picks_llama3_for_a_base_tokenizer_that_has_its_tokens(llama3_tokenizer) -> None:
    tok = fresh(llama3_tokenizer)
    tok.chat_template = None
    assert choose_template(tok) == "llama3"
    assert Renderer(tok).render(CHAT[1:], add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>")


@pytest.mark.parametrize("name", ["zephyr", "alpaca", "plain"])
def test_builtin_saved_with_the_tokenizer_renders_identically(base_tokenizer, tmp_path: Path, name: str) -> None:
    tok = fresh(base_tokenizer)
    assert choose_template(tok, name) == name
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for gen in (False, True):
        messages = CHAT if not gen else CHAT[:2]
        assert again.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
            Renderer(tok).render(messages, add_generation_prompt=gen)
    assert end_of_turn_ids(again) == [tok.eos_token_id]


def test_template_needing_missing_tokens_is_refused(base_tokenizer) -> None:
    tok = fresh(base_tokenizer)
    with pytest.raises(UserError) as err:
        choose_template(tok, "llama3")
    assert "<|eot_id|>" in str(err.value) and "zephyr" in err.value.problems[0]
    assert tok.chat_template is None


def test_unknown_template_and_missing_own_template(base_tokenizer) -> None:
    with pytest.raises(UserError, match="allowed: auto"):
        choose_template(fresh(base_tokenizer), "vicuna")
    with pytest.raises(UserError, match="no chat template of its own"):
        choose_template(fresh(base_tokenizer), "tokenizer")


def test_builtin_chatml_on_a_chatml_vocabulary() -> None:
    """Explicit --template chatml on a tokenizer without a template: uses its tokens, vocab unchanged."""
    tok = tiny.make_tokenizer("chatml")
    tok.chat_template = None
    size = len(tok)
    assert choose_template(tok, "chatml") == "chatml"
    assert len(tok) == size
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok)) == ["<|im_end|>"]


def test_config_accepts_exactly_the_template_names() -> None:
    from tunesmith.config import TEMPLATES, DataOptions
    from tunesmith.data.templates import TEMPLATE_NAMES

    assert set(TEMPLATES) == set(TEMPLATE_NAMES)
    with pytest.raises(UserError, match="invalid value for template"):
        DataOptions(template="vicuna")
