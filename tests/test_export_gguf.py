"""GGUF export round trips: the file loads back in transformers (its own GGUF reader) and in gguf's
reader with the same logits (exact for f16, a stated bound for q8_0), the same token ids, and the
chat template and EOS/EOT in its metadata; a tiny LoRA run's merged model survives the trip too."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from export_helpers import arch_configs, f16_rounded, gguf_fields, load_gguf_model, tiny_lora_run
from tunesmith.errors import UserError

TEXTS = ["Hello world, the cat is big 123!", "  two  spaces\nand a newline", "WHY is the sky blue?? 42",
         "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]


@pytest.fixture(scope="module")
def source_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def export(model_dir: Path, out: Path, quant: str, to: str = "gguf") -> Path:
    from tunesmith.export.api import export_model

    result = export_model(str(model_dir), to=to, quant=quant, output=str(out))
    return next(f for f in result.files if f.suffix == ".gguf")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # (1, T, V)


def test_f16_round_trip_is_exact_and_keeps_tokenizer_and_template(tiny_model_dir, source_model, tmp_path, one_thread):
    from transformers import AutoTokenizer

    model, tokenizer = source_model
    path = export(tiny_model_dir, tmp_path, "f16")
    back = load_gguf_model(path)
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    assert torch.equal(logits(f16_rounded(copy.deepcopy(model)), ids), logits(back, ids))
    back_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert back_tok(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids
    meta = gguf_fields(path)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == eot and meta["tokenizer.ggml.eot_token_id"] == eot
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["general.architecture"] == "llama"


def test_q8_0_weights_within_one_step_and_logits_close(tiny_model_dir, source_model, tmp_path, one_thread):
    """Q8_0 stores each block of 32 as int8 times one f16 scale (absmax / 127): every weight is
    within one quantisation step of the source, and the logits within 2% of their range."""
    model, tokenizer = source_model
    path = export(tiny_model_dir, tmp_path, "q8_0")
    back = load_gguf_model(path)
    source = dict(model.named_parameters())
    for name, param in back.named_parameters():
        w, q = source[name].detach().numpy(), param.detach().numpy()
        if w.ndim < 2:
            assert np.array_equal(w, q), name  # 1-D tensors stay f32
            continue
        step = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert (np.abs(w - q).reshape(-1, 32) <= step * 1.001 + 1e-8).all(), name
    ids = tokenizer(TEXTS[2], return_tensors="pt").input_ids
    a, b = logits(model, ids), logits(back, ids)
    assert (a - b).abs().max() <= 0.02 * a.abs().max()
    assert path.stat().st_size < 0.6 * export(tiny_model_dir, tmp_path / "f16", "f16").stat().st_size


def test_bf16_round_trip_matches_torch_bfloat16(tiny_model_dir, source_model, tmp_path, one_thread):
    model, tokenizer = source_model
    back = load_gguf_model(export(tiny_model_dir, tmp_path, "bf16"))
    for (name, p), (_, q) in zip(model.named_parameters(), back.named_parameters()):
        want = p.detach().to(torch.bfloat16).float() if p.ndim > 1 else p.detach()
        assert torch.equal(want, q.detach()), name


def test_gguf_reader_sees_every_tensor_with_llama_cpp_names(tiny_model_dir, tmp_path):
    from gguf import GGUFReader

    reader = GGUFReader(str(export(tiny_model_dir, tmp_path, "q8_0")))
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in names  # tied to token_embd, which llama.cpp reuses
    assert names["token_embd.weight"] == "Q8_0" and names["blk.1.attn_k.weight"] == "Q8_0"
    assert names["blk.0.attn_norm.weight"] == "F32" and names["output_norm.weight"] == "F32"
    assert len(names) == 2 + 2 * 9


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_every_supported_architecture_round_trips_exactly(arch, chatml_tokenizer, tmp_path, one_thread):
    """Random norms (Gemma's are stored +1), Q/K permutation (Llama), fused QKV (Phi-3), Q/K norms (Qwen3)."""
    from transformers import AutoModelForCausalLM

    from tunesmith.export.gguf import write_gguf

    tok = chatml_tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch_configs(len(tok), tok.pad_token_id)[arch]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    f16_rounded(model)
    path = write_gguf(model, tok, tmp_path / "m.gguf", "f16", [tok.convert_tokens_to_ids("<|im_end|>")])
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    assert torch.equal(logits(model, ids), logits(load_gguf_model(path), ids))


def test_unsupported_architecture_is_refused_by_name(chatml_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunesmith.export.gguf import write_gguf

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(chatml_tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UserError, match="'gpt2' architecture") as info:
        write_gguf(model, chatml_tokenizer, tmp_path / "m.gguf", "f16", [])
    assert any("--to merged" in line for line in info.value.lines())
    assert not (tmp_path / "m.gguf").exists()


def test_k_quant_without_llama_cpp_exits_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    """Where llama-cpp-python is missing (None in sys.modules makes its import fail, installed or not),
    `tunesmith export --quant q4_k_m` exits 2 naming the extra and the build flags, and writes nothing."""
    import sys

    import tiny
    from tunesmith.cli import main

    model_dir = tiny.make_model_dir(tmp_path / "wide", hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert main(["export", str(model_dir), "--quant", "q4_k_m", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tunesmith: q4_k_m needs llama.cpp's quantiser, which is not installed" in err
    assert 'pip install "tunesmith[llama]"' in err and "-DGGML_AMX_TILE=OFF" in err and "llama-quantize" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k"])
def test_k_quant_refuses_a_model_whose_rows_are_never_a_multiple_of_256(quant, source_model, tmp_path):
    """hidden 64 / intermediate 128: every matrix would fall back to a 32-block type in llama.cpp."""
    from tunesmith.export.gguf import write_gguf

    model, tokenizer = source_model
    with pytest.raises(UserError, match="blocks of 256 values") as info:
        write_gguf(model, tokenizer, tmp_path / "m.gguf", quant, [4])
    assert "row lengths: 64, 128; hidden_size 64" in str(info.value)
    assert any("--quant q8_0" in line for line in info.value.problems)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    return tiny_lora_run(tiny_model_dir, tmp_path_factory.mktemp("lora-export"), report=False)


def test_lora_run_merges_and_round_trips(lora_run, tmp_path, one_thread):
    """merged == base + adapter (peft's forward), and its f16 GGUF == the merged model rounded to f16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.model.load import load_model

    merged_dir = tmp_path / "merged"
    from tunesmith.export.api import export_model

    export_model(str(lora_run), to="merged", output=str(merged_dir))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(TEXTS[1], return_tensors="pt").input_ids
    peft_model = load_model(str(lora_run), device=torch.device("cpu"), dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert torch.allclose(logits(peft_model, ids), logits(merged, ids), atol=1e-5)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(lora_run).chat_template
    path = export(lora_run, tmp_path / "gguf", "f16")
    assert torch.equal(logits(f16_rounded(merged), ids), logits(load_gguf_model(path), ids))
    assert gguf_fields(path)["tokenizer.chat_template"] == tokenizer.chat_template


def test_llama3_rope_factors_match_transformers_frequencies():
    """rope_freqs (llama.cpp divides each base frequency by it) against transformers' own llama3 RoPE."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tunesmith.export.arch import head_dim, llama3_rope_factors

    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    dim = head_dim(config)
    base = 1.0 / 500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    factors = torch.from_numpy(llama3_rope_factors(config)).double()
    assert torch.allclose(base / factors, scaled.double(), rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == 32.0
    assert llama3_rope_factors(LlamaConfig()) is None


def test_sentencepiece_style_tokenizer_round_trips(tmp_path):
    """Llama-2 / Mistral style: BPE with byte fallback and a "\u2581" word prefix becomes llama.cpp's
    "llama" tokenizer (scores from the merge ranks, byte tokens typed BYTE)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, PreTrainedTokenizerFast

    import tiny
    from tunesmith.export.gguf import write_gguf

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(tiny.corpus(), trainer=trainers.BpeTrainer(vocab_size=800, special_tokens=specials))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model = AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=len(hf), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0))
    path = write_gguf(model, hf, tmp_path / "m.gguf", "f16", [hf.eos_token_id])
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in [*TEXTS[:3], "\u00e9moji \u2603 and \u00fc"]:
        assert back(text, add_special_tokens=False).input_ids == hf(text, add_special_tokens=False).input_ids
    meta = gguf_fields(path)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.token_type"][hf.convert_tokens_to_ids("<0x41>")] == 6  # BYTE
    assert meta["tokenizer.ggml.token_type"][hf.unk_token_id] == 2  # UNKNOWN


def test_default_output_never_writes_into_the_installed_package(tmp_path, monkeypatch):
    """The bundled starter lives in site-packages: its export goes to the working directory."""
    from types import SimpleNamespace

    import tunesmith
    from tunesmith.export.api import default_output

    monkeypatch.chdir(tmp_path)
    starter = Path(tunesmith.__file__).resolve().parent / "assets" / "starter"
    got = default_output(SimpleNamespace(name=str(starter), path=starter), "gguf")
    assert got == tmp_path / "starter-export-gguf"
    run = tmp_path / "my-run"
    run.mkdir()
    assert default_output(SimpleNamespace(name="my-run", path=run), "merged") == run / "merged"
    assert default_output(SimpleNamespace(name="org/model", path=None), "ollama") == Path("org--model/export-ollama")
