"""Generation: seeds, greedy vs. cache-free argmax, stopping at end-of-turn, prompts, the Python API.

`trained_chat_model` (used by the chat and CLI tests too) fits a tiny model in a few
hundred plain-PyTorch steps to answer two fixed questions, so "answers X and stops at
its end-of-turn token" can be checked exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny
from tunesmith.errors import UserError
from tunesmith.infer.generate import (Completion, Model, generate_batch, load, prompt_ids, read_prompts,
                                      stop_token_ids, stream_text)
from tunesmith.infer.sampling import SamplingOptions

CHATS = {  # question -> the answer the trained model gives
    "tell me about the cat": "The cat is small and quick.",
    "what is two plus two": "Four.",
}
GREEDY = SamplingOptions(greedy=True, max_new_tokens=24)


def train_chat_model(path: Path, style: str = "llama3", steps: int = 120) -> Path:
    """Save a tiny model trained to give CHATS' answers, each followed by the end-of-turn token.

    Labels cover the reply and the end-of-turn token only (the prompt is -100), like SFT.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny.make_model_dir(path, style)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    rows = []
    for question, answer in CHATS.items():
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        reply = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt + reply, [-100] * len(prompt) + reply))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])  # (2, T), right-padded
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(ids) for ids, _ in rows])[:, None]).long()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains several times faster on one thread
    try:
        for _ in range(steps):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.05, f"the fixture model did not learn its answers (loss {loss.item():.3f})"
    model.save_pretrained(path)
    return path


def trained_dir(tmp_path_factory: pytest.TempPathFactory, style: str = "llama3") -> Path:
    """The trained model of this test session (trained once, shared by the test modules)."""
    path = tmp_path_factory.getbasetemp() / f"trained-{style}"
    if not (path / "model.safetensors").is_file():
        train_chat_model(path, style)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return load(str(trained_dir(tmp_path_factory)), device="cpu")


@pytest.fixture(scope="module")
def random_model(tiny_model_dir: Path) -> Model:
    return load(str(tiny_model_dir), device="cpu")


def test_trained_model_answers_and_stops_at_end_of_turn(trained: Model) -> None:
    questions = list(CHATS)
    out = generate_batch(trained.model, trained.tokenizer, questions, GREEDY)
    eot = trained.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for question, completion in zip(questions, out):
        assert completion.text.strip() == CHATS[question]
        assert completion.stopped and completion.token_ids[-1] == eot
        assert eot not in completion.token_ids[:-1]
    sampled = trained.generate(questions[1], temperature=0.3, seed=1)
    assert sampled.strip() == CHATS[questions[1]]


def cache_free_greedy(model: torch.nn.Module, prompt: list[int], steps: int, stop: list[int]) -> list[int]:
    """Reference decoding: full forward over the whole sequence each step (no KV cache), argmax."""
    ids = torch.tensor([prompt])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1, :]  # (1, V)
            token = int(logits.argmax(-1))
            new.append(token)
            if token in stop:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_greedy_equals_cache_free_argmax_in_a_left_padded_batch(random_model: Model) -> None:
    prompts = ["hello", "tell me about the big blue river and the small red fish please"]
    options = SamplingOptions(greedy=True, max_new_tokens=12)
    out = generate_batch(random_model.model, random_model.tokenizer, prompts, options)
    stop = stop_token_ids(random_model.model, random_model.tokenizer)
    for prompt, completion in zip(prompts, out):
        ids = prompt_ids(random_model.tokenizer, prompt)
        assert completion.token_ids == cache_free_greedy(random_model.model, ids, 12, stop)


def test_same_seed_same_output_and_stream_matches(random_model: Model) -> None:
    options = SamplingOptions(seed=7, max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0)
    first = generate_batch(random_model.model, random_model.tokenizer, ["hello", "the cat"], options)
    again = generate_batch(random_model.model, random_model.tokenizer, ["hello", "the cat"], options)
    assert first == again
    other = generate_batch(random_model.model, random_model.tokenizer, ["hello", "the cat"],
                           SamplingOptions(seed=8, max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0))
    assert other != first  # sampling from a near-uniform model: another seed gives another text
    alone = generate_batch(random_model.model, random_model.tokenizer, ["hello"], options)[0]
    streamed = list(stream_text(random_model.model, random_model.tokenizer, "hello", options))
    assert len(streamed) > 1 and "".join(streamed) == alone.text


def test_max_new_tokens_reached_is_not_stopped(random_model: Model) -> None:
    out = generate_batch(random_model.model, random_model.tokenizer, ["hello"],
                         SamplingOptions(greedy=True, max_new_tokens=3))
    assert out == [Completion(out[0].text, out[0].token_ids, False)] and len(out[0].token_ids) == 3


def test_stop_tokens_per_tokenizer_style(llama3_tokenizer, chatml_tokenizer, base_tokenizer) -> None:
    vocab = llama3_tokenizer.get_vocab()
    assert vocab["<|eot_id|>"] in stop_token_ids(None, llama3_tokenizer)
    assert chatml_tokenizer.get_vocab()["<|im_end|>"] in stop_token_ids(None, chatml_tokenizer)
    assert stop_token_ids(None, base_tokenizer) == [base_tokenizer.eos_token_id]


def test_prompts_rendered_with_template_or_raw(llama3_tokenizer, base_tokenizer) -> None:
    rendered = llama3_tokenizer.decode(prompt_ids(llama3_tokenizer, "Hi", system="Be brief"))
    assert rendered == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3_tokenizer.decode(prompt_ids(llama3_tokenizer, "Hi", raw=True)) == "Hi"
    assert base_tokenizer.decode(prompt_ids(base_tokenizer, "Hi there")) == "Hi there"  # no template: raw
    with pytest.raises(UserError, match="no chat template"):
        prompt_ids(base_tokenizer, [{"role": "user", "content": "Hi"}])


def test_read_prompts_formats_and_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text('"one"\n{"prompt": "two"}\n\n{"messages": [{"role": "user", "content": "three"}]}\n')
    assert read_prompts(str(good)) == ["one", "two", [{"role": "user", "content": "three"}]]
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n second \n")
    assert read_prompts(str(text)) == ["first prompt", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: expected a string"):
        read_prompts(str(bad))
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{x\n')
    with pytest.raises(UserError) as info:
        read_prompts(str(bad))
    assert [line.split(": ")[0] for line in info.value.problems] == [f"{bad}:1", f"{bad}:2"]
    with pytest.raises(UserError, match="no such file"):
        read_prompts(str(tmp_path / "missing.jsonl"))


def test_prompt_longer_than_context_window_is_a_user_error(random_model: Model) -> None:
    long_prompt = " ".join(["river"] * 600)
    with pytest.raises(UserError, match="context window"):
        random_model.generate(long_prompt, greedy=True)


def test_public_api_load_generate_stream(trained_dir_path: Path) -> None:
    import tunesmith

    model = tunesmith.load(str(trained_dir_path))
    question = "tell me about the cat"
    assert model.generate(question, greedy=True).strip() == CHATS[question]
    assert "".join(model.stream(question, greedy=True)).strip() == CHATS[question]
    messages = [{"role": "user", "content": question}]
    assert tunesmith.generate(model, messages, greedy=True).strip() == CHATS[question]


@pytest.fixture(scope="module")
def trained_dir_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_dir(tmp_path_factory)


def test_batch_results_keep_prompt_order(trained: Model) -> None:
    questions = ["what is two plus two", "tell me about the cat", "what is two plus two"]
    out = generate_batch(trained.model, trained.tokenizer, questions, GREEDY, batch_size=2)
    assert [c.text.strip() for c in out] == [CHATS[q] for q in questions]
    assert json.dumps([c.stopped for c in out]) == "[true, true, true]"


def test_lora_adapter_directory_loads_base_plus_adapter(trained_dir_path: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(trained_dir_path)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # a non-zero adapter, so ignoring it would show
    peft_model.save_pretrained(tmp_path / "adapter")  # adapter_config.json names the base directory
    loaded = load(str(tmp_path / "adapter"), device="cpu")
    ids = torch.tensor([prompt_ids(loaded.tokenizer, "tell me about the cat")])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(trained_dir_path)(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-2)
    assert isinstance(loaded.generate("hello", greedy=True, max_new_tokens=4), str)


def test_generation_uses_the_kv_cache(random_model: Model) -> None:
    lengths: list[int] = []
    embed = random_model.model.get_input_embeddings()
    handle = embed.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        generate_batch(random_model.model, random_model.tokenizer, ["hello"], SamplingOptions(greedy=True,
                                                                                              max_new_tokens=6))
    finally:
        handle.remove()
    assert lengths[0] > 1 and lengths[1:] == [1] * (len(lengths) - 1)  # after the prompt: one token per step


def test_top_k_one_sampling_equals_greedy(random_model: Model) -> None:
    sampled = random_model.generate("the cat", top_k=1, temperature=1.5, seed=3, max_new_tokens=10)
    assert sampled == random_model.generate("the cat", greedy=True, max_new_tokens=10)


def test_system_prompt_with_raw_is_refused(llama3_tokenizer, base_tokenizer) -> None:
    with pytest.raises(UserError, match="--raw"):
        prompt_ids(llama3_tokenizer, "Hi", raw=True, system="Be brief")
    with pytest.raises(UserError, match="base model"):
        prompt_ids(base_tokenizer, "Hi", system="Be brief")


def test_small_cpu_models_decode_on_one_thread_and_restore_the_setting(random_model: Model,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesmith.infer.generate as generate_module

    seen: list[int] = []
    embed = random_model.model.get_input_embeddings()
    handle = embed.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        options = SamplingOptions(greedy=True, max_new_tokens=3)
        generate_batch(random_model.model, random_model.tokenizer, ["hello"], options)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        list(stream_text(random_model.model, random_model.tokenizer, "hello", options))
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(generate_module, "ONE_THREAD_BELOW_PARAMETERS", 0)  # a "large" model keeps the pool
        generate_batch(random_model.model, random_model.tokenizer, ["hello"], options)
        assert set(seen) == {2}
    finally:
        handle.remove()
        torch.set_num_threads(before)
