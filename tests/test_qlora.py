"""QLoRA on CPU (bitsandbytes runs NF4 there): 4-bit base, only LoRA trains, the loss falls, the
adapter is a normal peft adapter on the 16-bit base, and --merge reloads the base in 16 bits."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tunesmith.errors import UserError
from tunesmith.model import fast

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory, one_thread):
    from test_train_api import confident_model_dir, write_qa

    from tunesmith.train.api import finetune

    tmp = tmp_path_factory.mktemp("qlora")
    base = confident_model_dir(tiny_model_dir, tmp / "base")
    data = write_qa(tmp / "qa.jsonl")
    result = finetune(model=str(base), data=str(data), method="qlora", lr=1e-2, max_steps=30,
                      test_split=0.0, merge=True, output=str(tmp / "out"), report=False)
    return result, base


def test_base_linear_layers_are_4bit_and_only_lora_trains(tiny_model_dir, one_thread):
    import bitsandbytes as bnb

    from tunesmith.config import MethodOptions
    from tunesmith.methods import PARAMETER_SETS
    from tunesmith.model.load import load_model

    qlora = PARAMETER_SETS["qlora"]
    options = qlora.load_options(torch.device("cpu"), torch.float32)
    assert options["quantization_config"].bnb_4bit_quant_type == "nf4"
    assert options["quantization_config"].bnb_4bit_use_double_quant
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32, **options)
    model = qlora.wrap(model, MethodOptions(method="qlora"))
    assert fast.quantized(fast.causal_lm(model))  # so the fast path keeps CUDA graphs off (not measured on NF4)
    linears = [m for n, m in model.named_modules() if n.endswith(("q_proj.base_layer", "down_proj.base_layer"))]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert model.get_base_model().get_input_embeddings().weight.dtype == torch.float32  # not quantised
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    probe = torch.randn(3, 64)
    bases = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # bitsandbytes may repack 4-bit bytes for its CPU kernel on the first forward, so a frozen
    # 4-bit layer is checked by what it computes, every other weight by its values
    with torch.no_grad():
        model(input_ids=torch.randint(0, 600, (1, 4)))
        outputs = {n: m(probe) for n, m in bases.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype != torch.uint8}
    ids = torch.randint(0, 600, (1, 32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable  # norms and embeddings did not move
    with torch.no_grad():
        for n, m in bases.items():
            torch.testing.assert_close(m(probe), outputs[n], rtol=0, atol=0)  # nor did the 4-bit weights


def test_qlora_run_saves_a_peft_adapter_on_the_16bit_base(qlora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, base_dir = qlora_run
    out = result.output_dir
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < 0.7 * losses[0]  # the loss falls
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # plain, unquantised
    tuned = PeftModel.from_pretrained(base, out)
    assert not any(type(m).__name__ == "Linear4bit" for m in tuned.modules())
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Say hello", return_tensors="pt")["input_ids"]
    assert tuned.generate(ids, max_new_tokens=5, do_sample=False).shape[1] > ids.shape[1]


def test_qlora_merge_is_a_standalone_16bit_model_that_pipeline_loads(qlora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, pipeline

    result, base_dir = qlora_run
    merged_dir = result.output_dir / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                          result.output_dir).merge_and_unload()
    ids = torch.randint(0, 600, (1, 12))
    torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits)  # 16-bit merge
    text = pipeline("text-generation", model=str(merged_dir))("Say hello", max_new_tokens=4)[0]["generated_text"]
    assert text.startswith("Say hello")


def test_missing_bitsandbytes_exits_2_naming_the_extra(monkeypatch):
    from tunesmith.methods import recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match="--method qlora needs bitsandbytes") as info:
        recipe("qlora", "sft").check_installed()
    assert 'pip install "tunesmith[qlora]"' in info.value.problems[0]


def test_missing_bitsandbytes_from_the_cli_exits_2(tiny_model_dir, tmp_path):
    code = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'bitsandbytes' else real(n, *a); "
            "from tunesmith.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "train", "--model", str(tiny_model_dir), "--method", "qlora",
                           "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "tunesmith[qlora]" in proc.stderr and "Traceback" not in proc.stderr


def test_a_model_bitsandbytes_cannot_quantise_is_a_clear_error(tmp_path, one_thread):
    """A model without linear layers for bitsandbytes to replace (GPT-2's heads are Conv1D only when
    transformers can convert them; here every projection is excluded) is refused, not trained 16-bit."""
    from transformers import BitsAndBytesConfig

    from tunesmith.config import MethodOptions
    from tunesmith.methods import PARAMETER_SETS
    from tunesmith.model.load import load_model
    from tiny import make_model_dir

    path = make_model_dir(tmp_path / "m")
    skip = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    options = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip)}
    model = load_model(str(path), device=torch.device("cpu"), dtype=torch.float32, **options)
    with pytest.raises(UserError, match="bitsandbytes quantised no layer"):
        PARAMETER_SETS["qlora"].wrap(model, MethodOptions(method="qlora"))


def test_qlora_cannot_start_from_an_adapter_dir(qlora_run):
    from tunesmith.model.load import load_model

    result, _ = qlora_run
    options = {"quantization_config": object()}
    with pytest.raises(UserError, match="cannot be the base of a quantised run"):
        load_model(str(result.output_dir), device=torch.device("cpu"), dtype=torch.float32, **options)


def test_qlora_gradients_match_lora_on_the_dequantised_weights(tiny_model_dir, one_thread):
    """Ground truth outside our code: LoRA (peft) on a plain model whose linear weights are the
    dequantised NF4 weights must give the same loss and adapter gradients as QLoRA."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    from transformers import AutoModelForCausalLM

    from tunesmith.config import MethodOptions
    from tunesmith.methods import PARAMETER_SETS
    from tunesmith.model.load import load_model

    qlora, lora, options = PARAMETER_SETS["qlora"], PARAMETER_SETS["lora"], MethodOptions(method="qlora")
    quant = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32,
                       **qlora.load_options(torch.device("cpu"), torch.float32))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # before any forward: the bytes are still in the standard NF4 layout
        for name, module in quant.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = bf.dequantize_4bit(module.weight.data, module.weight.quant_state)
                plain.get_submodule(name).weight.copy_(w)
    torch.manual_seed(0)
    quant = qlora.wrap(quant, options)
    torch.manual_seed(0)
    plain = lora.wrap(plain, options)
    for model in (quant, plain):
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # B starts at zero, which would hide a wrong path
    ids = torch.randint(0, 600, (1, 24))
    grads = []
    for model in (quant, plain):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, g in grads[0][1].items():  # bitsandbytes' CPU kernel repacks the 4-bit constants: ~0.2% noise
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-3, atol=1e-2 * float(g.abs().max()))


def _nf4_lora_case(with_bias: bool) -> tuple[torch.Tensor, ...]:
    """A freshly quantised NF4 weight (packed bytes, state, its dequantised copy), adapters,
    input and optional frozen bias."""
    import bitsandbytes.functional as bf

    torch.manual_seed(0)
    packed, state = bf.quantize_4bit(torch.randn(48, 64), quant_type="nf4", compress_statistics=True)
    a, b = torch.randn(8, 64, requires_grad=True), torch.randn(48, 8, requires_grad=True)
    x, bias = torch.randn(2, 5, 64, requires_grad=True), torch.randn(48) if with_bias else None
    return packed, state, bf.dequantize_4bit(packed, state), a, b, x, bias


def _assert_dequantised_math(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                             bias: torch.Tensor | None) -> None:
    """`y` and its gradients are those of x W^T (+ bias) + 0.5 (x A^T) B^T."""
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b), g)
    x_ref, a_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y_ref = x_ref @ w.t() + 0.5 * (x_ref @ a_ref.t()) @ b_ref.t() + (bias if bias is not None else 0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(y_ref, (x_ref, a_ref, b_ref), g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_bias", [False, True])  # a frozen base bias (Qwen2's q/k/v) too
def test_fused_nf4_lora_node_matches_the_dequantised_math(with_bias):
    """The fast path's `Lora4bit` (CUDA-only in training) against x W^T (+ bias) + s (x A^T) B^T
    with W the dequantised NF4 weight, forward and backward; run here on freshly quantised CPU bytes."""
    from tunesmith.model import lora_node

    packed, state, w, a, b, x, bias = _nf4_lora_case(with_bias)
    _assert_dequantised_math(lora_node.Lora4bit.apply(x, packed, a, b, 0.5, state, bias), x, w, a, b, bias)


@pytest.mark.parametrize("with_bias", [False, True])
def test_compiled_nf4_lora_form_saves_the_4bit_bytes_not_the_16bit_weight(with_bias):
    """Inside compiled layers the NF4 LoRA node is `lora4bit_compiled`: with the partitioner the GPU
    uses (min-cut, here without inductor's code generation) the backward keeps the packed bytes and
    their statistics, never the dequantised (out, in) weight (13 GiB on the 8B shape), and it
    computes what the dequantised math does. (`Lora4bit` itself, compiled, saves that weight.)"""
    from tunesmith.model import lora_node

    packed, state, w, a, b, x, bias = _nf4_lora_case(with_bias)
    torch._dynamo.reset()
    node = torch.compile(lambda x: lora_node.lora4bit_compiled(x, packed, a, b, 0.5, state, bias),
                         backend="aot_eager_decomp_partition", fullgraph=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = node(x)
    assert not [t for t in saved if t.is_floating_point() and tuple(t.shape) == (48, 64)]
    assert any(t.dtype == torch.uint8 and t.numel() == packed.numel() for t in saved)
    _assert_dequantised_math(y, x, w, a, b, bias)


def test_cpu_4bit_layers_keep_peft_forward(tiny_model_dir, one_thread):
    from tunesmith.config import MethodOptions
    from tunesmith.methods import PARAMETER_SETS
    from tunesmith.model import lora_node
    from tunesmith.model.load import load_model

    qlora, cpu = PARAMETER_SETS["qlora"], torch.device("cpu")
    model = load_model(str(tiny_model_dir), device=cpu, dtype=torch.float32, **qlora.load_options(cpu, torch.float32))
    model = qlora.wrap(model, MethodOptions(method="qlora"))
    assert lora_node.fuse_lora_layers(model) == 0  # bitsandbytes' CPU layout is not what dequantize_4bit reads


def test_quantised_weights_are_placed_on_the_current_cuda_device(monkeypatch):
    """`device_map` for a plain "cuda" device is the current ordinal (ran only on a GPU before:
    a NameError there stopped every QLoRA run on CUDA)."""
    import torch

    from tunesmith.model.load import _device_index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _device_index(torch.device("cuda")) == 3
    assert _device_index(torch.device("cuda", 1)) == 1
    assert _device_index(torch.device("cpu")) == "cpu"
