"""llama.cpp itself on the exported GGUF: k-quants made by its own quantiser, its tokenizer and chat
template rendering give tunesmith's prompt ids, and its greedy decoding gives the same reply tokens
and stops at the same end-of-turn token as `tunesmith generate`, for f16, q8_0 and q4_k_m.

Runs only where llama-cpp-python is installed (it builds llama.cpp from source, so CI skips it).
The model is a tiny full fine-tune with rows of 256 (k-quants need rows that are a multiple of 256)
that has memorised six answers, so greedy replies are real sentences, not ties between junk tokens.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
from export_helpers import gguf_fields, wide_model_dir
from test_train_api import QA, write_qa

from tunesmith.export.kquant import INSTALL, K_QUANTS, K_TYPES

llama_cpp = pytest.importorskip(
    "llama_cpp", reason=f"llama.cpp tests need llama-cpp-python, which is not installed here: {INSTALL}")

RUNTIME_QUANTS = ["f16", "q8_0", "q4_k_m"]
MAX_NEW = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from tunesmith.train.api import finetune

    tmp = tmp_path_factory.mktemp("llama-cpp-run")
    base = wide_model_dir(tmp / "base")
    result = finetune(model=str(base), data=str(write_qa(tmp / "qa.jsonl")), method="full", lr=3e-3,
                      max_steps=50, test_split=0.0, output=str(tmp / "run"), report=False)
    return result.output_dir


@pytest.fixture(scope="module")
def reference(trained):
    """tunesmith's own model and greedy replies (the ids include the stop token) to each question."""
    from tunesmith.infer.generate import generate_batch, load
    from tunesmith.infer.sampling import SamplingOptions

    tuned = load(str(trained), device="cpu")
    replies = generate_batch(tuned.model, tuned.tokenizer, [q for q, _ in QA],
                             SamplingOptions(greedy=True, max_new_tokens=MAX_NEW))
    assert [(r.text, r.stopped) for r in replies] == [(a, True) for _, a in QA]  # memorised, not junk
    return tuned, replies


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """One `tunesmith export` per quant: {quant: ExportResult}."""
    from tunesmith.export.api import export_model

    out = tmp_path_factory.mktemp("llama-cpp-gguf")
    return {q: export_model(str(trained), quant=q, output=str(out)) for q in RUNTIME_QUANTS}


def open_llama(path: Path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)


def greedy(llm, prompt: list[int]) -> list[int]:
    """llama.cpp's greedy continuation, up to and including the first end-of-generation token."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(out) == MAX_NEW:
            break
    return out


def c_render(llm, messages: list[dict[str, str]]) -> str:
    """libllama's own template renderer (llama_chat_apply_template) on the template stored in the file."""
    template = llama_cpp.llama_model_chat_template(llm.model, None)
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(8192)
    n = llama_cpp.llama_chat_apply_template(template, chat, len(messages), True, buf, len(buf))
    assert 0 < n <= len(buf), n
    return buf.raw[:n].decode()


def test_k_quants_come_from_llama_cpp_and_keep_the_metadata(exported):
    path = exported["q4_k_m"].files[0]
    f16 = exported["f16"].files[0]
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    matrices = {n: t for n, t in types.items() if not n.endswith("norm.weight")}
    assert set(matrices.values()) <= K_TYPES and "Q4_K" in matrices.values(), matrices
    assert exported["q4_k_m"].notes == []  # every row is a multiple of 256: nothing fell back
    meta, ref = gguf_fields(path), gguf_fields(f16)
    assert meta["general.file_type"] == K_QUANTS["q4_k_m"]
    for key in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.tokens"):
        assert meta[key] == ref[key], key
    sizes = [exported[q].files[0].stat().st_size for q in RUNTIME_QUANTS]
    assert sizes[2] < sizes[1] < sizes[0]
    assert not list(path.parent.glob("*.f16.gguf.*")) and not list(path.parent.glob("tmp*"))


def test_llama_cpp_tokenizes_and_renders_prompts_as_tunesmith(reference, exported):
    """The same prompt ids from: llama.cpp's tokenizer on tunesmith's text, libllama's template
    renderer (adding BOS as llama.cpp does), and llama-cpp-python's jinja formatter (what
    create_chat_completion uses) on the template in the file; a system turn and 2 turns included."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tunesmith.infer.generate import prompt_ids

    tuned, _ = reference
    llm = open_llama(exported["f16"].files[0])
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], bos_token="<|begin_of_text|>",
                                    eos_token="<|eot_id|>")
    conversations = [[{"role": "user", "content": q}] for q, _ in QA] + [[
        {"role": "system", "content": "You answer briefly."}, {"role": "user", "content": QA[0][0]},
        {"role": "assistant", "content": QA[0][1]}, {"role": "user", "content": QA[1][0]}]]
    for messages in conversations:
        text = tuned.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = prompt_ids(tuned.tokenizer, messages)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert llm.tokenize(c_render(llm, messages).encode(), add_bos=True, special=True) == ids
        assert formatter(messages=messages).prompt == text


@pytest.mark.parametrize("quant", RUNTIME_QUANTS)
def test_llama_cpp_greedy_reply_and_stop_match_tunesmith_generate(quant, reference, exported):
    tuned, replies = reference
    from tunesmith.infer.generate import prompt_ids

    llm = open_llama(exported[quant].files[0])
    eot = tuned.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for (question, _), reply in zip(QA, replies):
        got = greedy(llm, prompt_ids(tuned.tokenizer, question))
        assert got == reply.token_ids, (quant, question, llm.detokenize(got))
        assert got[-1] == eot


def test_create_chat_completion_replies_and_stops_like_tunesmith(reference, exported):
    """llama-cpp-python's chat API on the q4_k_m file: the template from the file, greedy, stops at EOT."""
    _, replies = reference
    llm = open_llama(exported["q4_k_m"].files[0])
    for (question, _), reply in zip(QA, replies):
        out = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0.0,
                                         top_k=1, max_tokens=MAX_NEW)
        assert out["choices"][0]["message"]["content"] == reply.text
        assert out["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("quant", ["q5_k_m", "q6_k"])
def test_other_k_quants_are_written_by_llama_cpp(quant, tmp_path):
    from tunesmith.export.api import export_model

    model_dir = wide_model_dir(tmp_path / "m", num_hidden_layers=1)
    path = export_model(str(model_dir), quant=quant, output=str(tmp_path / "out")).files[0]
    meta = gguf_fields(path)
    assert meta["general.file_type"] == K_QUANTS[quant]
    from gguf import GGUFReader

    kinds = {t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) == 2}
    assert kinds <= K_TYPES and ("Q6_K" in kinds if quant == "q6_k" else "Q5_K" in kinds), kinds


def test_rows_that_are_not_a_multiple_of_256_are_named_in_a_note(tmp_path):
    """intermediate 640: ffn_down's rows (640) do not split into 256-blocks, and llama.cpp stores it in a
    32-block type instead; the export says so rather than calling the file plain q4_k_m."""
    from gguf import GGUFReader

    from tunesmith.export.api import export_model

    model_dir = wide_model_dir(tmp_path / "m", intermediate_size=640, num_hidden_layers=1)
    result = export_model(str(model_dir), quant="q4_k_m", output=str(tmp_path / "out"))
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(result.files[0])).tensors}
    assert types["blk.0.ffn_down.weight"] in {"Q5_0", "Q8_0"} and types["blk.0.ffn_up.weight"] in K_TYPES
    assert len(result.notes) == 1
    note = result.notes[0]
    assert note.startswith("note: 1 of ") and "multiple of 256" in note and "have 640" in note
    assert types["blk.0.ffn_down.weight"] in note and note in result.lines()


def test_a_quantiser_failure_is_one_clear_error_with_llama_cpp_s_reason(tmp_path, capfd):
    """llama.cpp's log is captured while it quantises; on failure its own reason is the message."""
    from tunesmith.errors import UserError
    from tunesmith.export.kquant import quantize

    bad = tmp_path / "not-a.gguf"
    bad.write_bytes(b"GGUF but not really" * 10)
    with pytest.raises(UserError, match="llama.cpp's quantiser failed on .*not-a.gguf: .*failed to quantize"):
        quantize(bad, tmp_path / "out.gguf", "q4_k_m")
    assert "failed to quantize" not in capfd.readouterr().err  # captured, not sprayed on stderr
