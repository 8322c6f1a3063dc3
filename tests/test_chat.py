"""Chat: history kept and re-rendered, stops at end-of-turn, /reset, /save, trimming, the REPL."""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_generate import CHATS, trained_dir
from tunesmith.data.readers import read_conversations
from tunesmith.errors import UserError
from tunesmith.infer.chat import Chat, repl
from tunesmith.infer.generate import Model, load, prompt_ids

QUESTIONS = list(CHATS)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return load(str(trained_dir(tmp_path_factory)), device="cpu")


def test_chat_answers_stops_and_keeps_history(trained: Model) -> None:
    chat = Chat(trained, greedy=True, max_new_tokens=24)
    assert chat.send(QUESTIONS[0]) == CHATS[QUESTIONS[0]]
    assert "".join(chat.stream(QUESTIONS[1])).strip() == CHATS[QUESTIONS[1]]
    assert chat.messages == [
        {"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": CHATS[QUESTIONS[0]]},
        {"role": "user", "content": QUESTIONS[1]}, {"role": "assistant", "content": CHATS[QUESTIONS[1]]},
    ]
    # the second turn was rendered with the first in front of it
    seen = trained.tokenizer.decode(prompt_ids(chat.tokenizer, chat.messages[:3]))
    assert seen.count("<|start_header_id|>user") == 2 and CHATS[QUESTIONS[0]] in seen
    chat.reset()
    assert chat.messages == [] and chat.trimmed == 0


def test_save_appends_messages_jsonl_the_readers_accept(trained: Model, tmp_path: Path) -> None:
    chat = Chat(trained, system="You are terse.", greedy=True, max_new_tokens=24)
    with pytest.raises(UserError, match="nothing to save"):
        chat.save(tmp_path / "t.jsonl")
    chat.send(QUESTIONS[1])
    assert chat.save(tmp_path / "t.jsonl") == 3
    chat.reset()
    chat.send(QUESTIONS[0])
    chat.save(tmp_path / "t.jsonl")
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["messages"][0] == {"role": "system", "content": "You are terse."}
    conversations, report = read_conversations(str(tmp_path / "t.jsonl"))
    assert report.format == "messages" and len(conversations) == 2
    assert [t.role for t in conversations[1].turns] == ["system", "user", "assistant"]


def test_oldest_turns_trimmed_past_the_context_window(trained: Model) -> None:
    """The mechanics, not the tiny model's wording: which messages reach the model."""
    chat = Chat(trained, system="Be brief.", greedy=True, max_new_tokens=24)
    for question in QUESTIONS * 2:
        chat.send(question)
    history = list(chat.messages)
    full = len(prompt_ids(chat.tokenizer, [{"role": "system", "content": "Be brief."}, *history,
                                          {"role": "user", "content": QUESTIONS[0]}]))
    window = trained.model.config.max_position_embeddings
    trained.model.config.max_position_embeddings = full  # a window too small for the whole history
    seen: list[list[dict[str, str]]] = []
    original = chat._visible
    chat._visible = lambda options: seen.append(original(options)) or seen[-1]  # type: ignore[method-assign]
    try:
        chat.send(QUESTIONS[0])
        visible = seen[-1]
        dropped = chat.trimmed
        assert dropped >= 2 and dropped % 2 == 0  # whole user/assistant pairs, oldest first
        assert visible[0] == {"role": "system", "content": "Be brief."}  # the system prompt is always kept
        assert visible[1:] == [*history, {"role": "user", "content": QUESTIONS[0]}][dropped:]
        assert visible[1]["role"] == "user"
        budget = full - min(24, full // 2)
        assert len(prompt_ids(chat.tokenizer, visible)) <= budget < len(prompt_ids(chat.tokenizer, [
            visible[0], *history[dropped - 2:], {"role": "user", "content": QUESTIONS[0]}]))  # the fewest dropped
        assert len(chat.messages) == len(history) + 2  # the history itself keeps everything
        with pytest.raises(UserError, match="too long"):
            chat.send(" ".join(["river"] * full))
        assert len(chat.messages) == len(history) + 2  # the refused message is not kept
    finally:
        trained.model.config.max_position_embeddings = window


def test_stopping_a_stream_keeps_the_partial_reply(trained: Model) -> None:
    chat = Chat(trained, greedy=True, max_new_tokens=24)
    pieces = chat.stream(QUESTIONS[0])
    first = next(piece for piece in pieces if piece.strip())
    pieces.close()  # what Ctrl-C does in the REPL
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.messages[-1]["content"] == first.strip()
    assert CHATS[QUESTIONS[0]].startswith(chat.messages[-1]["content"])


def test_base_model_gets_a_builtin_template(tiny_base_model_dir: Path) -> None:
    model = load(str(tiny_base_model_dir), device="cpu")
    chat = Chat(model, greedy=True, max_new_tokens=4)
    assert chat.template_note and "no chat template" in chat.template_note
    assert not getattr(model.tokenizer, "chat_template", None)  # the loaded model itself is untouched
    chat.send("hello")
    assert [m["role"] for m in chat.messages] in (["user", "assistant"], [])


def test_repl_commands_from_a_script(trained: Model, tmp_path: Path) -> None:
    script = iter([QUESTIONS[1], "/system Be kind.", f"/save {tmp_path / 'c.jsonl'}", "/reset", "/bogus",
                   QUESTIONS[0], "quit", "never read"])

    def read(prompt: str) -> str:
        return next(script)

    out = io.StringIO()
    chat = Chat(trained, greedy=True, max_new_tokens=24)
    repl(chat, read=read, out=out)
    text = out.getvalue()
    assert CHATS[QUESTIONS[1]] in text and CHATS[QUESTIONS[0]] in text
    assert "(history cleared)" in text and "unknown command /bogus" in text
    assert chat.messages == [{"role": "user", "content": QUESTIONS[0]},
                             {"role": "assistant", "content": CHATS[QUESTIONS[0]]}]
    saved = json.loads((tmp_path / "c.jsonl").read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"]  # answered before /system: saved without it
    assert "a new conversation starts" in text
    assert next(script) == "never read"  # "quit" ended the loop


def test_system_change_starts_a_new_conversation_and_save_keeps_each_prompt(trained: Model, tmp_path: Path) -> None:
    chat = Chat(trained, system="You are terse.", greedy=True, max_new_tokens=24)
    first = chat.send(QUESTIONS[0])
    assert chat.set_system("Be kind.") is True  # replies exist: a new conversation
    assert chat.messages == [] and chat.system == "Be kind."
    assert chat.set_system("Be very kind.") is False  # nothing answered under "Be kind." yet
    second = chat.send(QUESTIONS[1])
    assert chat._visible(chat.sampling)[0] == {"role": "system", "content": "Be very kind."}
    assert len(chat._visible(chat.sampling)) == 3  # the earlier conversation is not seen
    chat.save(tmp_path / "s.jsonl")
    lines = [json.loads(line)["messages"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert lines == [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTIONS[0]},
         {"role": "assistant", "content": first}],
        [{"role": "system", "content": "Be very kind."}, {"role": "user", "content": QUESTIONS[1]},
         {"role": "assistant", "content": second}],
    ]



def script_reader(lines: list[str]):
    """A `read` for the REPL that ends like Ctrl-D after the last line."""
    queue = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(queue)
        except StopIteration:
            raise EOFError from None

    return read


def test_repl_ctrl_c_stops_only_the_reply(trained: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = Chat(trained, greedy=True, max_new_tokens=24)
    real_stream = chat.stream
    calls = []

    def first_interrupted(text: str) -> Iterator[str]:
        pieces = real_stream(text)
        try:
            for piece in pieces:
                yield piece
                if not calls and piece.strip():
                    calls.append(piece)
                    raise KeyboardInterrupt  # as if Ctrl-C arrived while the first reply streamed
        finally:
            pieces.close()

    monkeypatch.setattr(chat, "stream", first_interrupted)
    out = io.StringIO()
    repl(chat, read=script_reader([QUESTIONS[0], QUESTIONS[1]]), out=out)
    assert "(reply stopped)" in out.getvalue()
    assert [m["content"] for m in chat.messages] == [QUESTIONS[0], calls[0].strip(), QUESTIONS[1], CHATS[QUESTIONS[1]]]
