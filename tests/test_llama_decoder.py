"""infer.llama against transformers' own LlamaForCausalLM: the same logits on left-padded batches, the same
greedy and seeded replies through infer.generate, and every checkpoint it cannot compute exactly refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tunesmith.infer.generate import generate_batch, load, stream_text
from tunesmith.infer.llama import LlamaDecoder, load_plain_llama
from tunesmith.infer.sampling import SamplingOptions
from tunesmith.model.load import STARTER_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def untied_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama unlike the defaults: untied head, head_dim != hidden/heads, other rope theta, larger weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("untied")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, path / name)
    base = json.loads((tiny_model_dir / "config.json").read_text())
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=base["vocab_size"], hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=5e5,
                         rms_norm_eps=1e-5, max_position_embeddings=256, initializer_range=0.2,
                         tie_word_embeddings=False, bos_token_id=base["bos_token_id"],
                         eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"])
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("which", ["tiny", "untied"])
def test_logits_equal_transformers_on_a_left_padded_batch(which, tiny_model_dir, untied_dir) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir if which == "tiny" else untied_dir
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_plain_llama(str(path), torch.device("cpu"), torch.float32)
    assert isinstance(ours, LlamaDecoder)
    torch.manual_seed(0)
    ids = torch.randint(6, reference.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as generate_batch builds it
    mask[2, :9] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = mask.bool()
        causal = torch.ones(11, 11, dtype=torch.bool).tril()
        attend = (causal[None] & keep[:, None, :]) | torch.eye(11, dtype=torch.bool)
        got = ours.forward(ids, positions, attend[:, None], [])
    real = keep[:, :, None].expand_as(got)  # padded positions' outputs are never used
    assert expected.abs().max() > 0.5  # not a near-constant model
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["tiny", "untied"])
def test_replies_equal_transformers_greedy_batched_and_seeded(which, tiny_model_dir, untied_dir) -> None:
    path = str(tiny_model_dir if which == "tiny" else untied_dir)
    light, plain = load(path, device="cpu", light=True), load(path, device="cpu")
    assert isinstance(light.model, LlamaDecoder) and not isinstance(plain.model, LlamaDecoder)
    prompts = ["the cat", "tell me about the cat and the dog please", "hi"]
    greedy = SamplingOptions(greedy=True, max_new_tokens=12, repetition_penalty=1.3)
    ours = generate_batch(light.model, light.tokenizer, prompts, greedy)
    theirs = generate_batch(plain.model, plain.tokenizer, prompts, greedy)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [c.stopped for c in ours] == [c.stopped for c in theirs]
    sampled = SamplingOptions(temperature=1.2, top_k=20, top_p=0.95, seed=7, max_new_tokens=12)
    assert generate_batch(light.model, light.tokenizer, prompts[:1], sampled)[0].token_ids == \
        generate_batch(plain.model, plain.tokenizer, prompts[:1], sampled)[0].token_ids
    streamed = "".join(stream_text(light.model, light.tokenizer, prompts[1], greedy))
    assert streamed == theirs[1].text


def test_the_starter_loads_light_and_answers_as_transformers_does() -> None:
    light, plain = load(None, device="cpu", light=True), load(None, device="cpu")
    assert isinstance(light.model, LlamaDecoder)
    options = SamplingOptions(greedy=True, max_new_tokens=16)
    assert generate_batch(light.model, light.tokenizer, ["Hello"], options)[0].token_ids == \
        generate_batch(plain.model, plain.tokenizer, ["Hello"], options)[0].token_ids


def test_checkpoints_it_cannot_compute_exactly_go_through_transformers(tiny_model_dir, tmp_path) -> None:
    def variant(name: str, change: dict) -> str:
        path = tmp_path / name
        shutil.copytree(tiny_model_dir, path)
        config = json.loads((path / "config.json").read_text())
        config.update(change)
        (path / "config.json").write_text(json.dumps(config))
        return str(path)

    cpu, f32 = torch.device("cpu"), torch.float32
    assert load_plain_llama(variant("llama3-rope", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}), cpu, f32) is None
    assert load_plain_llama(variant("bias", {"attention_bias": True}), cpu, f32) is None
    assert load_plain_llama(variant("mistral", {"architectures": ["MistralForCausalLM"],
                                                "model_type": "mistral"}), cpu, f32) is None
    adapter = variant("adapter", {})
    (Path(adapter) / "adapter_config.json").write_text("{}")
    assert load_plain_llama(adapter, cpu, f32) is None
    assert load_plain_llama("org/some-hub-id", cpu, f32) is None
    assert (STARTER_DIR / "model.safetensors").is_file()
