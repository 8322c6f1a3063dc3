"""An uncached hub id offline fails in about a second, with what to do, instead of ~48 s of retries."""
from __future__ import annotations

import time

import pytest

from tunesmith.errors import UserError
from tunesmith.model import load


@pytest.fixture(autouse=True)
def imported() -> None:
    """Time the loading, not the first import of transformers."""
    import huggingface_hub  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def test_offline_env_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"someorg/not-a-model: not in the local Hugging Face cache, and offline"):
        load.load_tokenizer("someorg/not-a-model")
    assert time.perf_counter() - started < 2.0


def test_unreachable_hub_fails_in_about_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: as good as no network
    load.hub_reachable.cache_clear()
    started = time.perf_counter()
    try:
        with pytest.raises(UserError, match="the Hugging Face hub cannot be reached"):
            load.load_model("someorg/not-a-model")
    finally:
        load.hub_reachable.cache_clear()
    assert time.perf_counter() - started < 3.0


def test_a_cached_model_loads_from_the_cache_when_offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: str(tmp_path / name))
    assert load.hub_options("someorg/cached") == {"local_files_only": True}
    assert load.hub_options(str(tmp_path)) == {}  # a local directory needs no hub


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_chatml_model_dir", "tiny_base_model_dir", "starter"])
def test_light_tokenizer_loading_matches_autotokenizer(fixture: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoTokenizer

    source = str(load.STARTER_DIR) if fixture == "starter" else str(request.getfixturevalue(fixture))
    assert load.light_tokenizer_class(source) is not None  # these directories take the light path
    light, auto = load.load_tokenizer(source), AutoTokenizer.from_pretrained(source)
    assert type(light) is type(auto)
    text = "Hello <b>world</b>, ünïcode and  spaces\n"
    assert light(text).input_ids == auto(text).input_ids
    assert light.all_special_tokens == auto.all_special_tokens
    assert (light.bos_token_id, light.eos_token_id, light.pad_token_id) == (auto.bos_token_id, auto.eos_token_id,
                                                                           auto.pad_token_id)
    assert light.chat_template == auto.chat_template
    if auto.chat_template:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        assert light.apply_chat_template(messages, tokenize=False) == auto.apply_chat_template(messages, tokenize=False)


def test_data_inspect_does_not_import_torch(tmp_path) -> None:
    import subprocess
    import sys

    code = ("import sys; from tunesmith.cli import main; "
            "rc = main(['data', 'inspect', sys.argv[1], '--samples', '1']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'")
    example = load.STARTER_DIR.parent / "examples" / "chat.jsonl"
    proc = subprocess.run([sys.executable, "-c", code, str(example)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
