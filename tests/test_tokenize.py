"""Loss masks: exactly the assistant contents plus their end-of-turn tokens are trained, for any template."""
from __future__ import annotations

import copy

import pytest

from tunesmith.data.conversation import Conversation, Turn
from tunesmith.data.templates import Renderer, choose_template
from tunesmith.data.tokenize import (IGNORE_INDEX, TemplateMismatch, TokenizedSample, tokenize_all,
                                     tokenize_conversation)
from tunesmith.errors import UserError

MULTI = Conversation(turns=[
    Turn("system", "You are terse."), Turn("user", "  what is the sun?  "), Turn("assistant", " A star.\n"),
    Turn("user", "and the moon"), Turn("assistant", "A rock,  mostly\n\nGREY 42 "),
], source="t:1")
SINGLE = Conversation(turns=[Turn("user", "Hi"), Turn("assistant", "Hello there")], source="t:2")


def trained_runs(tokenizer, sample: TokenizedSample) -> list[str]:  # noqa: ANN001
    """The decoded text of each run of consecutive trained tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(sample.input_ids, sample.labels):
        trained = label != IGNORE_INDEX
        if trained and not previous:
            runs.append([])
        if trained:
            runs[-1].append(token)
        previous = trained
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def with_template(tokenizer, name: str):  # noqa: ANN001, ANN201
    """A private copy of a session tokenizer with template `name` installed."""
    tok = copy.deepcopy(tokenizer)
    if name != "tokenizer":
        tok.chat_template = None
    choose_template(tok, name)
    return tok


@pytest.mark.parametrize("conv", [MULTI, SINGLE], ids=["multi", "single"])
def test_llama3_mask_equals_hf_assistant_mask(llama3_tokenizer, conv: Conversation) -> None:
    sample = tokenize_conversation(conv, llama3_tokenizer, max_length=512)
    hf = llama3_tokenizer.apply_chat_template(conv.messages(), return_assistant_tokens_mask=True, return_dict=True)
    assert sample.input_ids == hf["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in sample.labels] == hf["assistant_masks"]
    assert sum(hf["assistant_masks"]) > 0
    assert [label for label in sample.labels if label != IGNORE_INDEX] == \
        [t for t, m in zip(sample.input_ids, hf["assistant_masks"]) if m]


# (fixture, template, how the template renders an assistant content, the end-of-turn token)
CASES = [
    ("llama3_tokenizer", "tokenizer", str.strip, "<|eot_id|>"),
    ("llama3_tokenizer", "llama3", lambda s: s, "<|eot_id|>"),
    ("chatml_tokenizer", "tokenizer", lambda s: s, "<|im_end|>"),
    ("base_tokenizer", "zephyr", lambda s: s, "</s>"),
    ("base_tokenizer", "alpaca", lambda s: s, "</s>"),
    ("base_tokenizer", "plain", lambda s: " " + s, "</s>"),  # the prompt ends "Assistant:", the model writes " ..."
]


@pytest.mark.parametrize("fixture,template,shown,eot", CASES)
def test_trained_tokens_are_assistant_contents_plus_end_of_turn(request, fixture, template, shown, eot) -> None:  # noqa: ANN001
    tok = with_template(request.getfixturevalue(fixture), template)
    sample = tokenize_conversation(MULTI, tok, max_length=512)
    assistants = [t.content for t in MULTI.turns if t.role == "assistant"]
    assert trained_runs(tok, sample) == [shown(a) + eot for a in assistants]
    # here no BPE merge crosses a prompt/reply boundary, so the ids are those of the whole rendering,
    # which the sample ends right after the last end-of-turn (what follows it is never trained)
    whole = tok(Renderer(tok).render(MULTI.messages()), add_special_tokens=False)["input_ids"]
    assert sample.input_ids == whole[:len(sample.input_ids)]
    assert tok.decode(whole[len(sample.input_ids):]).strip() == ""
    if tok.bos_token_id is not None:
        assert sample.input_ids.count(tok.bos_token_id) == 1 and sample.input_ids[0] == tok.bos_token_id


def test_train_on_prompt_trains_everything(chatml_tokenizer) -> None:
    sample = tokenize_conversation(MULTI, chatml_tokenizer, max_length=512, train_on_prompt=True)
    assert sample.labels == sample.input_ids


def test_doubled_bos_is_deduplicated(base_tokenizer) -> None:
    tok = with_template(base_tokenizer, "zephyr")
    tok.chat_template = "{{ bos_token }}" + tok.chat_template  # a template that adds BOS itself, twice
    sample = tokenize_conversation(SINGLE, tok, max_length=512)
    assert sample.input_ids.count(tok.bos_token_id) == 1


def test_truncation_is_counted_and_fully_truncated_samples_are_reported(llama3_tokenizer) -> None:
    long_prompt = Conversation(turns=[Turn("user", "tell me " * 60), Turn("assistant", "ok")], source="f:7")
    samples, report = tokenize_all([SINGLE, long_prompt, MULTI], llama3_tokenizer, max_length=60)
    assert report.truncated == 2 and len(samples) == 2 and report.samples == 2
    assert all(len(s.input_ids) <= 60 for s in samples)
    assert len(report.dropped) == 1 and report.dropped[0].startswith("f:7: no trained token left")
    assert report.lengths[1] > 60 and samples[1].num_trained > 0


def test_text_documents_get_bos_eos_and_are_chunked_not_truncated(base_tokenizer) -> None:
    doc = Conversation(text="the quick red fox " * 40, source="book.txt:1")
    body = base_tokenizer.encode(doc.text, add_special_tokens=False)
    samples, report = tokenize_all([doc], base_tokenizer, max_length=32)
    ids = [t for s in samples for t in s.input_ids]
    assert ids == [base_tokenizer.bos_token_id, *body, base_tokenizer.eos_token_id]
    assert all(len(s.input_ids) <= 32 for s in samples) and len(samples) > 1
    assert all(s.labels == s.input_ids for s in samples) and report.chunked_documents == 1


def test_preference_needs_dpo(chatml_tokenizer) -> None:
    pair = Conversation(turns=[Turn("user", "q")], chosen=[Turn("assistant", "a")], rejected=[Turn("assistant", "b")])
    with pytest.raises(UserError, match="--objective dpo or orpo"):
        tokenize_conversation(pair, chatml_tokenizer, max_length=64)


def test_generation_prompt_that_differs_from_training_is_refused(base_tokenizer) -> None:
    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = ("{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{ 'ASSISTANT:' }}{%- endif %}")
    with pytest.raises(TemplateMismatch) as err:
        tokenize_conversation(SINGLE, tok, max_length=64)
    assert "add_generation_prompt" in str(err.value) and "--template" in err.value.problems[-1]


HISTORY_REWRITING = (  # like Qwen3: only assistant turns after the last user message get a think block
    "{%- set ns = namespace(last=0) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m['role'] == 'assistant' and loop.index0 > ns.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_template_that_rewrites_history_trains_every_turn_in_its_inference_context(chatml_tokenizer) -> None:
    """Was: earlier turns left untrained. Now: one sample per turn, each rendered as inference renders it."""
    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = HISTORY_REWRITING
    samples, report = tokenize_all([MULTI], tok, max_length=512)
    assert report.split_conversations == 1 and report.split_samples == 2 and len(samples) == 2
    assert [trained_runs(tok, s) for s in samples] == [
        ["<think>\n\n</think>\n\n A star.\n<|im_end|>"], ["<think>\n\n</think>\n\nA rock,  mostly\n\nGREY 42 <|im_end|>"]]
    for sample, i in zip(samples, (2, 4)):  # the context of each is exactly the inference prompt
        prompt = tok.apply_chat_template(MULTI.messages()[:i], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert sample.input_ids[:len(ids)] == ids and set(sample.labels[:len(ids)]) == {IGNORE_INDEX}
    assert "split into 2 samples" in report.notices()[0]


def test_sentencepiece_style_tokenizer_masks_match_whole_text_tokenization() -> None:
    """Metaspace (prepend "▁" to the first piece) breaks piecewise tokenizing; whole-text + offsets does not."""
    import tiny
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.train_from_iterator(tiny.corpus(), trainer=trainers.BpeTrainer(vocab_size=400,
                                                                       special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    choose_template(tok, "zephyr")
    conv = Conversation(turns=[Turn("user", "hello"), Turn("assistant", "The sun is big")], source="s:1")
    sample = tokenize_conversation(conv, tok, max_length=256)
    whole = tok(Renderer(tok).render(conv.messages()), add_special_tokens=False)["input_ids"]
    assert sample.input_ids == whole[:len(sample.input_ids)]
    trained = [t for t in sample.labels if t != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(trained)[-1] == "</s>"
    assert "".join(tok.convert_ids_to_tokens(trained[:-1])).replace("▁", " ").strip() == "The sun is big"


NO_SYSTEM = ("{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{%- endif %}{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{%- endfor %}"
             "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}")


def test_a_system_prompt_is_folded_where_the_template_has_no_system_role(base_tokenizer) -> None:
    """Was: refused with the template's message. Now: folded into the first user turn, counted; or refused."""
    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = NO_SYSTEM
    samples, report = tokenize_all([MULTI], tok, max_length=256)
    assert report.folded_system == 1 and "raises 'System role not supported'" in report.notices()[0]
    assert tok.decode(samples[0].input_ids).startswith("user: You are terse.\n\n  what is the sun?  </s>")
    assert trained_runs(tok, samples[0]) == [" A star.\n</s>", "A rock,  mostly\n\nGREY 42 </s>"]
    with pytest.raises(UserError) as err:
        tokenize_all([SINGLE, MULTI], tok, max_length=256, fold_system=False)
    assert str(err.value) == "1 samples cannot be trained the way inference renders them"
    assert err.value.problems[0].startswith("t:1: turn 1: the chat template has no system role (it raises")


def test_a_template_that_raises_names_the_sample_and_turn(base_tokenizer) -> None:
    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = ("{%- if messages | length > 3 %}{{ raise_exception('Too many turns') }}{%- endif %}"
                         "{%- for m in messages %}{{ m['content'] + eos_token }}{%- endfor %}")
    with pytest.raises(UserError) as err:
        tokenize_conversation(MULTI, tok, max_length=64)
    assert str(err.value).startswith("t:1: turn 5: the chat template failed") and "Too many turns" in str(err.value)


def test_inference_turns_score_chosen_and_rejected_after_the_same_prompt(llama3_tokenizer) -> None:
    """The reusable per-turn view (what preference training needs): same prompt ids, each reply's own target."""
    from tunesmith.data.tokenize import TurnRenderer, inference_turns

    renderer = TurnRenderer(llama3_tokenizer)
    prompt = [Turn("system", "Be kind."), Turn("user", "Is the sun big?")]
    chosen, rejected = (inference_turns(Conversation(turns=[*prompt, Turn("assistant", reply)], source="p:1"),
                                        llama3_tokenizer, renderer=renderer)[-1] for reply in ("Yes, very.", "No."))
    text = llama3_tokenizer.apply_chat_template([{"role": t.role, "content": t.content} for t in prompt],
                                                tokenize=False, add_generation_prompt=True)
    assert chosen.prompt_ids == rejected.prompt_ids == llama3_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llama3_tokenizer.decode(chosen.target_ids) == "Yes, very.<|eot_id|>"
    assert llama3_tokenizer.decode(rejected.target_ids) == "No.<|eot_id|>" and chosen.number == 3
