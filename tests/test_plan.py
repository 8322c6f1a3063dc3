"""The memory plan: estimates from a config alone, checked against measured memory and real shapes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.errors import UserError
from tunesmith.train import plan

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def shape(name: str) -> plan.ModelShape:
    return plan.shape_from_config(json.loads((CONFIGS / f"{name}.json").read_text()), name)


def test_parameter_counts_match_the_published_sizes():
    assert shape("Llama-3.1-8B").parameters == pytest.approx(8.03e9, rel=0.002)
    assert shape("Qwen2.5-7B").parameters == pytest.approx(7.62e9, rel=0.005)  # Qwen: 7.61B (q/k/v biases aside)
    assert shape("Llama-3.2-1B").parameters == pytest.approx(1.236e9, rel=0.002)


def test_nf4_weights_take_about_a_quarter_of_bf16():
    s8 = shape("Llama-3.1-8B")
    bf16 = plan.static_parts(s8, plan.Setting(adapter=True))["weights"]
    nf4 = plan.static_parts(s8, plan.Setting(adapter=True, base_bits=4))["weights"]
    assert 14.5 < bf16 / 2**30 < 15.5 and 5.0 < nf4 / 2**30 < 6.0  # 4-bit linears, 16-bit embeddings + head


def test_more_tokens_cost_more_and_checkpointing_and_8bit_states_cost_less():
    s1 = shape("Llama-3.2-1B")
    lora = plan.Setting(adapter=True)
    assert plan.estimate(s1, lora, 4096).total < plan.estimate(s1, lora, 8192).total
    assert plan.estimate(s1, plan.with_checkpointing(lora, True), 8192).total < plan.estimate(s1, lora, 8192).total
    full = plan.Setting(adapter=False)
    assert (plan.static_parts(s1, plan.Setting(adapter=False, optim="adamw-8bit"))["optimizer"]
            < plan.static_parts(s1, full)["optimizer"] / 3)
    budget = plan.max_tokens(s1, lora, 24 * 2**30)
    assert budget % plan.TOKEN_STEP == 0 and plan.fits(plan.estimate(s1, lora, budget), 24 * 2**30)
    assert not plan.fits(plan.estimate(s1, lora, budget + plan.TOKEN_STEP), 24 * 2**30)


def _plan(model: str, memory: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "plan", "--model", model, "--gpu-memory", memory],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _fits(output: str) -> dict[tuple[str, str], str]:
    rows = [line.split() for line in output.splitlines() if line.split()[:1] in (["full"], ["lora"], ["qlora"])]
    return {(r[0], r[1]): r[4] for r in rows}


def test_plan_on_real_shapes_says_what_fits():
    llama8 = _fits(_plan(str(CONFIGS / "Llama-3.1-8B.json"), "24GB"))
    assert llama8[("full", "off")] == llama8[("full", "on")] == "no"  # 8B full fine-tuning: ~100+ GiB
    assert llama8[("qlora", "on")] == "yes" and llama8[("lora", "off")] == "no"
    big = _fits(_plan(str(CONFIGS / "Llama-3.1-8B.json"), "80GB"))
    assert big[("lora", "off")] == "yes" and big[("full", "off")] == "no"
    qwen = _plan(str(CONFIGS / "Qwen2.5-7B.json"), "24GB")
    assert _fits(qwen)[("qlora", "on")] == "yes" and _fits(qwen)[("full", "on")] == "no"
    small = _plan(str(CONFIGS / "Llama-3.2-1B.json"), "24GB")
    assert _fits(small)[("lora", "off")] == "yes"
    assert "recommended: tunesmith train --model" in small and "--method lora" in small


def test_plan_recommends_qlora_for_8b_on_a_consumer_card():
    """8B on 24 GB: QLoRA at 4,096 tokens without checkpointing (measured at 18.5 GiB on the
    compiled path); on 16 GB it takes checkpointing."""
    last = _plan(str(CONFIGS / "Llama-3.1-8B.json"), "24GB").splitlines()[-1]
    assert "--method qlora --batch-tokens 4096" in last and "--gradient-checkpointing" not in last
    last = _plan(str(CONFIGS / "Llama-3.1-8B.json"), "16GB").splitlines()[-1]
    assert "--method qlora" in last and "--gradient-checkpointing" in last


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/dir"], "no such directory"),
    (["--gpu-memory", "lots"], "invalid value for gpu_memory"),
    (["--model", "no-such-org/no-such-model"], "could not fetch the config"),  # offline, not cached
])
def test_plan_bad_input_exits_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "plan", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_config_that_is_not_a_decoder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper", "d_model": 512}))
    with pytest.raises(UserError, match="no hidden_size"):
        plan.shape_from_config(*plan.read_config(str(tmp_path)))


def test_memory_sizes_parse():
    assert plan.parse_memory("24GB") == plan.parse_memory("24 GiB") == 24 * 2**30
    assert plan.parse_memory("16000MB") == 16000 * 2**20


def test_without_a_budget_train_picks_the_largest_that_fits():
    s8 = shape("Llama-3.1-8B")
    qlora = plan.Setting(adapter=True, base_bits=4)
    choice = plan.choose(s8, qlora, 16 * 2**30, None)
    assert choice.checkpointing and plan.AUTO_MIN_TOKENS <= choice.batch_tokens <= plan.AUTO_MAX_TOKENS
    assert plan.choose(s8, qlora, 24 * 2**30, None) == plan.Choice(plan.AUTO_MIN_TOKENS, False, (
        "batch tokens: 4096 (the largest that fits 24.0 GiB; set --batch-tokens)",))
    given = plan.choose(s8, qlora, 24 * 2**30, 8192)
    assert given.batch_tokens == 8192 and given.checkpointing  # 8k tokens without checkpointing do not fit
    assert plan.choose(s8, qlora, None, None).batch_tokens == plan.DEFAULT_TOKENS  # CPU: nothing to size against
    assert "does not fit" in plan.advice(s8, plan.Setting(adapter=False), 4 * 2**30)


def test_graph_pool_room_counts_one_more_micro_batch_of_activations_and_gradients():
    """CUDA graphs (model/graphs.py) need the step's peak plus the recording's activations and
    gradient buffers: on a 24 GiB card the plan's own budget for 1B LoRA leaves no room for
    them, on an 80 GiB one it does."""
    s1 = shape("Llama-3.2-1B")
    lora = plan.Setting(adapter=True)
    small, big = 24 * 2**30, 80 * 2**30
    tokens = plan.choose(s1, lora, small, None).batch_tokens
    e = plan.estimate(s1, lora, tokens)
    assert plan.fits(e, small) and not plan.fits_graph_pool(s1, lora, tokens, small)
    assert plan.fits_graph_pool(s1, lora, tokens, big)
    pool = e.parts["activations"] + e.parts["gradients"]
    assert plan.fits_graph_pool(s1, lora, tokens, (e.total + pool) / plan.HEADROOM + 1)
    assert not plan.fits_graph_pool(s1, lora, tokens, (e.total + pool) / plan.HEADROOM - 2**20)


@pytest.mark.parametrize("method, checkpointing", [("full", False), ("lora", True), ("qlora", False)])
def test_estimate_is_within_bounds_of_measured_cpu_memory(tmp_path, method, checkpointing):
    """Measured: peak RSS growth of one real training step (tests/measure_step_memory.py, a fresh
    process) at 2048 tokens, fp32 and the plain loss as on CPU. Tolerance: 0.45x-1.4x (CPU kernels
    keep somewhat different temporaries than the CUDA path the plan is written for, and RSS
    varies upwards only: the smaller of two runs counts). Alone the LoRA + checkpointing case
    reads 0.72-0.88x; inside the full suite it twice read 0.44-0.48x (416-445 MB, the size of
    a step without checkpointing), for a reason not pinned down. So the model is now built in
    the measuring process under a minimal environment, the peak is restarted before the step
    (VmHWM, not the lifetime maximum), and the process must report checkpointing on."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    script = Path(__file__).parent / "measure_step_memory.py"
    # The model is built and saved inside the measuring process, with a minimal environment:
    # nothing this test process (or an earlier test) changed can reach the measurement.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    measured = None
    for _ in range(2):  # RSS noise only adds (allocator arenas, other work): the smaller of two runs
        proc = subprocess.run([sys.executable, str(script), str(tmp_path), method, "2048", str(int(checkpointing)),
                               json.dumps(config.to_dict())], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"checkpointing={checkpointing}" in proc.stderr, proc.stderr[-500:]
        measured = min(int(proc.stdout.split()[-1]), measured or 2**62)
    from tunesmith.methods import PARAMETER_SETS

    params = PARAMETER_SETS[method]
    setting = plan.Setting(adapter=params.adapter, base_bits=params.base_bits, checkpointing=checkpointing,
                           dtype_bytes=4, fused_loss=False, fused_lora=False, cuda=False)
    estimated = plan.estimate(plan.shape_from_config(config.to_dict()), setting, 2048).total
    assert 0.45 <= estimated / measured <= 1.4, (estimated / 2**20, measured / 2**20, proc.stderr[-300:])


# Peak allocated GiB of the compiled fast path (activation memory budget 0.9, CUDA graphs), one
# H200, bench/gpu_train.py --plan-check-fast (bench/results/h200-plan-check-fast-r14.json):
# (shape fixture, LoRA?, tokens, measured GiB).
MEASURED_FAST = [("Llama-3.2-1B", False, 4096, 15.52), ("Llama-3.2-1B", False, 8192, 19.10),
                 ("Llama-3.2-1B", False, 16384, 26.08), ("Llama-3.2-1B", True, 4096, 6.62),
                 ("Llama-3.2-1B", True, 8192, 10.41), ("Llama-3.2-1B", True, 16384, 17.98),
                 ("Llama-3.2-3B", False, 4096, 38.34), ("Llama-3.2-3B", False, 8192, 45.59),
                 ("Llama-3.2-3B", True, 4096, 14.99), ("Llama-3.2-3B", True, 8192, 23.11),
                 ("Qwen2.5-0.5B", False, 4096, 8.28), ("Qwen2.5-0.5B", False, 8192, 11.01),
                 ("Qwen2.5-0.5B", True, 4096, 4.85), ("Qwen2.5-0.5B", True, 8192, 7.78),
                 ("Llama-3.1-8B", "qlora", 4096, 18.50)]  # (--qlora, round 13: h200-qlora-budget-r13.json)


@pytest.mark.parametrize("name,adapter,tokens,measured", MEASURED_FAST)
def test_compiled_fast_path_estimate_is_just_above_its_measured_gpu_peak(name, adapter, tokens, measured):
    """The estimate of the compiled path covers what it measured on the GPU, by at most 20% (the
    eager figure was 35-70% over: a 24 GiB card got half the token budget it could hold)."""
    e = plan.estimate(shape(name), plan.Setting(adapter=bool(adapter), base_bits=4 if adapter == "qlora" else 16),
                      tokens)
    estimated = (e.total - e.parts["cuda context"]) / 2**30  # (the allocator's peak has no context)
    assert measured <= estimated <= 1.2 * measured, (estimated, measured)


def test_the_compiled_layer_figure_applies_only_where_it_was_measured():
    """Eager layers, checkpointed runs, fp32 (CPU) runs and peft's own LoRA forward keep the
    eager figure; the compiled one is under half of it."""
    s1 = shape("Llama-3.2-1B")
    fast = plan.layer_bytes_per_token(s1, plan.Setting(adapter=False))
    eager = plan.layer_bytes_per_token(s1, plan.Setting(adapter=False, compiled_layers=False))
    assert fast < 0.5 * eager
    for other in (dict(checkpointing=True), dict(dtype_bytes=4, cuda=False), dict(cuda=False),
                  dict(fused_lora=False)):
        s = plan.Setting(adapter=True, **other)
        assert plan.layer_bytes_per_token(s1, s) == plan.layer_bytes_per_token(s1, plan.replace(
            s, compiled_layers=False)), other
    assert "workspace" in plan.estimate(s1, plan.Setting(adapter=True), 4096).parts
    assert "workspace" not in plan.estimate(s1, plan.Setting(adapter=True, checkpointing=True), 4096).parts


def test_graphs_add_nothing_when_every_row_fits_the_budget_and_nothing_accumulates():
    """Rows of the budget reuse the recording's pool: with no sample over the budget and one
    micro-batch a step, graphs fit wherever the step does (what the H200 rows measured); a
    longer sample's eager row, or accumulated gradients, need room of their own."""
    s1 = shape("Llama-3.2-1B")
    lora = plan.Setting(adapter=True)
    card = 24 * 2**30
    tokens = plan.choose(s1, lora, card, None).batch_tokens
    assert plan.fits(plan.estimate(s1, lora, tokens), card)
    assert plan.fits_graph_pool(s1, lora, tokens, card, longest=tokens, accumulates=False)
    assert not plan.fits_graph_pool(s1, lora, tokens, card, longest=tokens + 1, accumulates=False)
    e = plan.estimate(s1, lora, tokens)
    just = e.total / plan.HEADROOM + 2**20
    assert plan.fits_graph_pool(s1, lora, tokens, just, longest=100, accumulates=False)
    assert not plan.fits_graph_pool(s1, lora, tokens, just, longest=100, accumulates=True)  # + the gradients' copy
    row = plan.estimate(s1, lora, 3 * 1024).parts["activations"]  # a 2,500-token sample over a 2,048 budget
    small = plan.estimate(s1, lora, 2048)
    assert plan.fits_graph_pool(s1, lora, 2048, (small.total + row) / plan.HEADROOM + 2**20, 2500, False)
    assert not plan.fits_graph_pool(s1, lora, 2048, (small.total + row) / plan.HEADROOM - 2**20, 2500, False)


def test_a_sample_longer_than_the_budget_must_fit_as_a_row_of_its_own():
    """8B QLoRA on 24 GiB trains 4,096-token rows without checkpointing; data with an 8,000-token
    sample (a row of 8,192 tokens) would not fit so, and the plan turns checkpointing on instead,
    for a given budget too."""
    s8 = shape("Llama-3.1-8B")
    qlora = plan.Setting(adapter=True, base_bits=4)
    card = 24 * 2**30
    assert plan.choose(s8, qlora, card, None, longest=4000) == plan.choose(s8, qlora, card, None)
    assert not plan.choose(s8, qlora, card, None).checkpointing
    long = plan.choose(s8, qlora, card, None, longest=8000)
    assert long.checkpointing and plan.fits(plan.estimate(s8, plan.with_checkpointing(qlora, True), plan.row_tokens(
        long.batch_tokens, 8000)), card)
    assert plan.choose(s8, qlora, card, 4096, longest=8000).checkpointing
    assert not plan.choose(s8, qlora, card, 4096, longest=4096).checkpointing
    assert plan.row_tokens(4096, 8000) == 8192 and plan.row_tokens(4096, 100) == 4096


def test_only_the_measured_families_get_the_compiled_figure():
    """Gemma's extra norms or Phi-3's fused projections save other tensors: until measured, their
    layers keep the eager figure."""
    config = json.loads((CONFIGS / "Llama-3.2-1B.json").read_text())
    llama = plan.shape_from_config(config, "llama")
    other = plan.shape_from_config({**config, "model_type": "gemma2"}, "gemma-like")
    s = plan.Setting(adapter=True)
    assert llama.family == "llama" and other.family == "gemma2"
    assert plan.layer_bytes_per_token(other, s) == plan.layer_bytes_per_token(
        other, plan.replace(s, compiled_layers=False)) > 1.5 * plan.layer_bytes_per_token(llama, s)
