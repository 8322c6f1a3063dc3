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
