"""The optimizer policy: bf16 weights + stochastic rounding track fp32 AdamW; plain bf16 would not."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.train.optim import AdamWBF16, block_table, make_optimizer, stochastic_round_bf16


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    x = torch.full((200_000,), 1.0 + 1 / 512, dtype=torch.float32)  # a quarter of the way between bf16 neighbours
    r = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    assert abs(r.mean().item() - x[0].item()) < 2e-5
    neg = stochastic_round_bf16(-x, torch.Generator().manual_seed(1)).float()
    assert abs(neg.mean().item() + x[0].item()) < 2e-5
    exact = torch.tensor([0.5, -3.0, 0.0])  # already representable: unchanged
    assert torch.equal(stochastic_round_bf16(exact).float(), exact)


def test_small_updates_survive_in_expectation():
    # lr 1e-5 on weights near 1: each update is ~1/800 of a bf16 step. Round-to-nearest loses all of them.
    w = torch.nn.Parameter(torch.ones(50_000, dtype=torch.bfloat16))
    opt = AdamWBF16([w], lr=1e-5)
    for _ in range(100):
        w.grad = torch.ones_like(w)
        opt.step()
    assert abs(w.float().mean().item() - (1.0 - 100 * 1e-5)) < 2e-4
    plain = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    sgd = torch.optim.AdamW([plain], lr=1e-5)
    for _ in range(100):
        plain.grad = torch.ones_like(plain)
        sgd.step()
    assert torch.all(plain == 1.0)  # the failure the policy exists to avoid


def _tiny(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).to(dtype)


def _curve(model: LlamaForCausalLM, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 128, (8, 8), generator=gen)
    losses = []
    for step in range(steps):
        ids = base[step % 8].repeat(1, 4)  # (1, 32): a learnable repeating pattern
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


class _Fp32Master:
    """Reference policy: fp32 master copies updated by AdamW, copied into the bf16 model."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        self.params = params
        self.master = [torch.nn.Parameter(p.detach().float()) for p in params]
        self.opt = torch.optim.AdamW(self.master, lr=lr)

    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = p.grad.float()
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def test_bf16_policy_tracks_fp32_master_weights_within_one_percent():
    steps = 80
    master = _tiny(torch.bfloat16)
    ref = _curve(master, _Fp32Master(list(master.parameters()), lr=3e-3), steps)
    bf16 = _tiny(torch.bfloat16)
    opt = make_optimizer(bf16.parameters(), lr=3e-3)
    assert isinstance(opt, AdamWBF16)
    got = _curve(bf16, opt, steps)
    assert ref[-1] < 0.6 * ref[0]  # it learned, so the comparison means something
    mean_ref, mean_got = sum(ref) / steps, sum(got) / steps
    assert abs(mean_got - mean_ref) / mean_ref < 0.01


def test_make_optimizer_policy_and_checkpointable_state():
    fp32 = torch.nn.Parameter(torch.zeros(3))
    assert type(make_optimizer([fp32], lr=1e-3)) is torch.optim.AdamW
    with pytest.raises(ValueError, match="mixed dtypes"):
        make_optimizer([fp32, torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], lr=1e-3)
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = make_optimizer([{"params": [w], "weight_decay": 0.0}], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    w.grad = torch.ones_like(w)
    opt.step()
    sched.step()
    state = opt.state_dict()
    assert state["state"][0]["step"] == 1 and state["state"][0]["exp_avg"].dtype == torch.float32
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_block_table_gives_every_element_to_exactly_one_program():
    sizes = [5000, 1, 4096, 4097, 12_345, 7]
    tensor, start = block_table(sizes, 4096)
    covered = [torch.zeros(n, dtype=torch.int64) for n in sizes]
    for t, s in zip(tensor.tolist(), start.tolist()):
        covered[t][s:s + 4096] += 1
    assert all(bool((c == 1).all()) for c in covered)
    assert tensor.dtype == torch.int32 and start.dtype == torch.int64
    assert len(tensor) == sum(-(-n // 4096) for n in sizes)


def test_clipping_inside_the_step_matches_torch_clipping():
    # optimizer_step hands AdamWBF16 the clip coefficient instead of scaling the grads first
    from tunesmith.train.loop import optimizer_step

    def run(fused: bool) -> tuple[list[torch.Tensor], float]:
        torch.manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in (300, 1000)]
        opt = AdamWBF16(ws, lr=1e-2, seed=3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        norms = []
        for step in range(5):
            gen = torch.Generator().manual_seed(step)
            for w in ws:
                w.grad = (torch.randn(w.shape, generator=gen) * 5).to(torch.bfloat16)
            if fused:
                norms.append(float(optimizer_step(opt, sched, grad_clip=1.0)))
            else:
                norms.append(float(torch.nn.utils.clip_grad_norm_(ws, 1.0)))
                opt.step()
                opt.zero_grad(set_to_none=True)
        return [w.detach().float() for w in ws], norms

    (got, got_norms), (ref, ref_norms) = run(True), run(False)
    assert got_norms == pytest.approx(ref_norms, rel=1e-6) and min(ref_norms) > 10  # clipping was active
    for g, r in zip(got, ref):  # same noise; the grads differ only by torch's bf16 rounding of the clipped grad
        ulp = r.abs() * 2**-7 + 1e-30
        assert float((g - r).abs().max()) < 1e-2  # less than one step of lr, after 5 steps
        assert float(((g - r).abs() / ulp).mean()) < 0.05  # and nearly every weight identical


def test_fused_kernel_matches_the_torch_ops_in_triton_interpreter():
    """The CUDA kernel's math, run by Triton's CPU interpreter, against `_adamw_bf16_torch`.

    A subprocess, because TRITON_INTERPRET is read when Triton is first imported.
    """
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("interpreted_adamw.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")
