"""Real chat templates of popular families on real vocabularies: trained tokens == what inference asks for.

The reference is computed here with transformers' own `apply_chat_template` and tokenizer,
never with tunesmith's code: for assistant turn i the model is given
P = apply_chat_template(messages[:i], add_generation_prompt=True) and must write what the
template adds after P for that turn, through the family's end-of-turn token (declared per
family in tests/fixtures/templates/families.json, from the models' own configs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from template_families import FAMILIES, make_tokenizer

from tunesmith.data.conversation import Conversation, Turn
from tunesmith.data.templates import end_of_turn_ids
from tunesmith.data.tokenize import IGNORE_INDEX, inference_turns, tokenize_all

REPLIES = [" Leading space, then a sentence.", "Trailing space and newline \n",
           "\n\nStarts with newlines.\nLine two\n\n- item ✓", "Ünïcödé 日本語 and emoji 🎉👍🏽 "]
USERS = ["Hi there", "  and then?  ", "more, please\n", "last one 🙂"]
THINK = "<think>\nLet me think about it.\n</think>\n\n"
SYSTEM = "You are terse.\nAnswer in English."
# what each family's template makes of multi-turn data, measured (the README's table says the same)
SPLIT = {"qwen2.5", "qwen3", "qwq", "deepseek-r1-distill-qwen", "deepseek-r1-distill-llama", "smollm2", "olmo-2"}  # split per turn when needed
FOLDS = {"gemma-2", "mistral-7b"}  # no system role: the system prompt is folded into the first user turn


def conversation(family: str, system: bool) -> Conversation:
    """Four turns with awkward replies; reasoning families get reasoning in every reply."""
    think = THINK if "opens" in FAMILIES[family] or FAMILIES[family].get("reasoning") else ""
    turns = [Turn("system", SYSTEM)] if system else []
    for user, reply in zip(USERS, REPLIES):
        turns += [Turn("user", user), Turn("assistant", think + reply)]
    return Conversation(turns=turns, source=f"{family}.jsonl:{1 + system}")


def reference_messages(family: str, conv: Conversation) -> list[dict[str, Any]]:
    """The messages inference would render: the system prompt folded into the first user turn where the
    template has no system role (what the user of such a model does by hand)."""
    messages = conv.messages()
    if family in FOLDS and messages[0]["role"] == "system":
        messages = [dict(m) for m in messages[1:]]
        messages[0]["content"] = f"{conv.turns[0].content}\n\n{messages[0]['content']}"
    return messages


def through_eot(text: str, content: str, eot: str) -> str:
    """`text` through the first `eot` after the reply's visible text."""
    start = text.find(content.strip()) + len(content.strip()) if content.strip() in text else 0
    return text[:text.index(eot, start) + len(eot)]


def reference(tok: Any, family: str, messages: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) per assistant turn, from transformers alone."""
    spec, out = FAMILIES[family], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        finished = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        content = message["content"]
        if "opens" in spec:  # the generation prompt opens the reasoning; the model writes the rest
            assert prompt.endswith(spec["opens"]) and content.startswith(spec["opens"])
            target = content[len(spec["opens"]):] + spec["eot"]
        elif finished.startswith(prompt):
            target = through_eot(finished[len(prompt):], content, spec["eot"])
        else:  # Mistral-Nemo shows the system prompt only in the last user turn: the reply follows [/INST]
            target = through_eot(finished.rsplit("[/INST]", 1)[1], content, spec["eot"])
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        s_ids = tok(prompt + target, add_special_tokens=False)["input_ids"]
        t_ids = s_ids[len(p_ids):] if s_ids[:len(p_ids)] == p_ids else tok(target, add_special_tokens=False)["input_ids"]
        assert tok.decode(p_ids + t_ids) == tok.decode(s_ids)
        out.append((p_ids, t_ids))
    return out


def trained_runs(sample: Any) -> list[tuple[int, list[int]]]:
    """(start, ids) of each run of consecutive trained tokens."""
    runs: list[tuple[int, list[int]]] = []
    for i, label in enumerate(sample.labels):
        if label == IGNORE_INDEX:
            continue
        if runs and runs[-1][0] + len(runs[-1][1]) == i:
            runs[-1][1].append(label)
        else:
            runs.append((i, [label]))
    return runs


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: Any) -> tuple[str, Any]:
    """A family's name and its tokenizer."""
    return request.param, make_tokenizer(request.param)


@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
def test_trained_tokens_are_exactly_the_inference_targets(family: tuple[str, Any], system: bool) -> None:
    name, tok = family
    conv = conversation(name, system)
    expected = reference(tok, name, reference_messages(name, conv))
    assert [(t.prompt_ids, t.target_ids) for t in inference_turns(conv, tok)] == expected
    samples, report = tokenize_all([conv], tok, max_length=4096)
    runs = [(sample, start, ids) for sample in samples for start, ids in trained_runs(sample)]
    assert [ids for _, _, ids in runs] == [t for _, t in expected]  # every turn trained once, exactly its target
    for (sample, start, _), (p_ids, _) in zip(runs, expected):
        assert sample.input_ids[:start] == p_ids  # in exactly the context inference gives it
    assert report.folded_system == (system and name in FOLDS)
    if report.split_conversations:
        assert name in SPLIT or (name == "mistral-nemo" and system)
    eot = tok.convert_ids_to_tokens(end_of_turn_ids(tok))
    assert set(FAMILIES[name]["stops"]) <= set(eot) and all(t[-1] in end_of_turn_ids(tok) for _, t in expected)


def test_families_that_rewrite_history_are_split_and_those_that_do_not_are_one_sample() -> None:
    for name in ("qwen3", "qwq", "deepseek-r1-distill-qwen", "deepseek-r1-distill-llama"):  # reasoning dropped from earlier turns: one sample per turn
        samples, report = tokenize_all([conversation(name, True)], make_tokenizer(name), max_length=4096)
        assert len(samples) == 4 and report.split_conversations == 1 and report.split_samples == 4
    for name in ("llama-3.1", "gemma-3", "phi-3.5", "mistral-small", "tinyllama", "granite-3", "command-r7b",
                 "command-r", "smollm3"):
        samples, report = tokenize_all([conversation(name, True)], make_tokenizer(name), max_length=4096)
        assert len(samples) == 1 and report.split_conversations == 0, name


def test_phi35_trains_every_turn_through_end_and_not_the_final_endoftext() -> None:
    tok = make_tokenizer("phi-3.5")
    samples, _ = tokenize_all([conversation("phi-3.5", True)], tok, max_length=4096)
    texts = [tok.decode(ids).lstrip() for _, ids in trained_runs(samples[0])]  # (SentencePiece drops a leading space)
    assert texts == [(r + "<|end|>").lstrip() for r in REPLIES]  # was: only the last turn, with <|assistant|> and <|endoftext|>


def test_qwen25_reply_starting_with_newlines_is_trained_after_the_prompts_own_newline() -> None:
    tok = make_tokenizer("qwen2.5")
    turns = inference_turns(conversation("qwen2.5", False), tok)
    third = turns[2]
    assert tok.decode(third.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(third.target_ids) == REPLIES[2] + "<|im_end|>"  # no stray token started inside the prompt


def test_smollm3_no_think_mode_trains_the_reply_after_the_empty_think_block() -> None:
    tok = make_tokenizer("smollm3")
    turns = [Turn("system", "/no_think Be brief.")] + [Turn(role, text) for pair in zip(USERS[:2], REPLIES[:2])
                                                        for role, text in zip(("user", "assistant"), pair)]
    conv = Conversation(turns=turns, source="smol.jsonl:1")
    expected = reference(tok, "smollm3", conv.messages())
    got = inference_turns(conv, tok)
    assert [(t.prompt_ids, t.target_ids) for t in got] == expected
    assert all(tok.decode(t.prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n") for t in got)
    assert [tok.decode(t.target_ids) for t in got] == [r + "<|im_end|>" for r in REPLIES[:2]]


def test_no_fold_system_refuses_with_file_line_turn_and_reason() -> None:
    from tunesmith.errors import UserError

    with pytest.raises(UserError) as err:
        tokenize_all([conversation("gemma-2", True)], make_tokenizer("gemma-2"), 4096, fold_system=False)
    assert err.value.problems[0].startswith("gemma-2.jsonl:2: turn 1: the chat template has no system role (it "
                                            "raises 'System role not supported')")


def test_a_reasoning_template_refuses_replies_that_do_not_continue_its_think_opening() -> None:
    from tunesmith.errors import UserError

    plain = Conversation(turns=[Turn("user", "Hi"), Turn("assistant", "Hello")], source="r1.jsonl:7")
    with pytest.raises(UserError) as err:
        tokenize_all([plain], make_tokenizer("deepseek-r1-distill-qwen"), 4096)
    assert err.value.problems[0].startswith("r1.jsonl:7: turn 2: the chat template renders this assistant turn "
                                            "differently at inference")
    assert "'<think>\\n'" in err.value.problems[0]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}


def tool_conversation() -> Conversation:
    """A user question, an assistant tool call, the tool's result, and the final answer."""
    call = {"type": "function", "id": "call12345", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    return Conversation(turns=[
        Turn("user", "Weather in Paris?"), Turn("assistant", "", tool_calls=(call,)),
        Turn("tool", '{"temp": 21}', tool_call_id="call12345"), Turn("assistant", "It is 21 °C in Paris.")],
        tools=[WEATHER], source="tools.jsonl:1")


@pytest.mark.parametrize("name", ["llama-3.1", "qwen2.5", "qwen3", "mistral-nemo"])
def test_tool_calls_are_trained_and_tool_results_are_not(name: str) -> None:
    tok = make_tokenizer(name)
    conv = tool_conversation()
    samples, _ = tokenize_all([conv], tok, max_length=4096)
    trained = [tok.decode(ids) for s in samples for _, ids in trained_runs(s)]
    assert len(trained) == 2 and "get_weather" in trained[0] and "Paris" in trained[0]
    assert trained[1].startswith(("It is 21", "<think>")) and all('"temp": 21' not in t for t in trained)
    context = tok.decode(samples[-1].input_ids)
    assert '"temp": 21' in context or "21}" in context  # the tool's result is context, not a target
    for turn in inference_turns(conv, tok):  # prompts (tool definitions, call, result) as inference renders them
        messages = conv.messages()[:turn.number - 1]
        prompt = tok.apply_chat_template(messages, tools=conv.tools, tokenize=False, add_generation_prompt=True)
        assert turn.prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"]


def test_templates_without_tool_support_refuse_tool_samples() -> None:
    from tunesmith.errors import UserError

    with pytest.raises(UserError) as err:
        tokenize_all([tool_conversation()], make_tokenizer("gemma-2"), 4096)
    assert err.value.problems[0].startswith("tools.jsonl:1: turn 2: this model's chat template does not render "
                                            "tool calls")


LORA_FAMILIES = ["llama-3.1", "qwen3", "gemma-2", "mistral-nemo", "phi-3.5", "phi-4", "tinyllama"]


@pytest.mark.parametrize("name", LORA_FAMILIES)
def test_lora_run_and_generate_stop_on_the_familys_end_of_turn(name: str, tmp_path: Path, one_thread: None) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tunesmith

    tok = make_tokenizer(name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    base = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": reference_messages("x", conversation(name, system))[:4 + system]} for system in (1, 0)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4), encoding="utf-8")
    out = tunesmith.finetune(model=str(base), data=str(data), method="lora", max_steps=2, test_split=0.0,
                             output=str(tmp_path / "out"), report=False).output_dir
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert set(tok.convert_tokens_to_ids(FAMILIES[name]["stops"])) <= set(stops)
    reply = tunesmith.generate(str(out), "Hi", max_new_tokens=4, seed=0)
    assert isinstance(reply, str)


def test_the_training_log_says_what_was_split_and_folded(tmp_path: Path) -> None:
    from tunesmith.config import DataOptions
    from tunesmith.data.prepare import prepare_data

    for name, note in (("qwen3", "note: 2 conversations were split into 8 samples"),
                       ("gemma-2", "note: folded the system prompt into the first user turn in 2 samples")):
        path = tmp_path / f"{name}.jsonl"
        rows = [{"messages": conversation(name, True).messages()}] * 2
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        logged: list[str] = []
        data = prepare_data(DataOptions(data=str(path), test_split=0.0), make_tokenizer(name),
                            cache_dir=tmp_path / "cache", log=logged.append)
        assert any(line.startswith(note) for line in logged), logged
        assert data.stats["split_samples" if name == "qwen3" else "folded_system"] == (8 if name == "qwen3" else 2)
