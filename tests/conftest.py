"""Shared fixtures: tiny tokenizers and models built offline, once per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not fight other processes for the 2 cores
    (threads contending for busy cores made these tests up to 30x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Llama-3-style tokenizer whose template trims content and marks generation spans."""
    return tiny.make_tokenizer("llama3")


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """Qwen-style ChatML tokenizer without BOS."""
    return tiny.make_tokenizer("chatml")


@pytest.fixture(scope="session")
def base_tokenizer():
    """Base-model tokenizer: BOS/EOS, no chat template, no pad token."""
    return tiny.make_tokenizer("base")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama model with the llama3-style tokenizer, saved as an HF directory."""
    return tiny.make_model_dir(tmp_path_factory.mktemp("tiny-llama3"), "llama3")


@pytest.fixture(scope="session")
def tiny_chatml_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama model with the ChatML tokenizer."""
    return tiny.make_model_dir(tmp_path_factory.mktemp("tiny-chatml"), "chatml")


@pytest.fixture(scope="session")
def tiny_base_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama model whose tokenizer has no chat template."""
    return tiny.make_model_dir(tmp_path_factory.mktemp("tiny-base"), "base")
