"""Run by test_optim.py under TRITON_INTERPRET=1: the fused AdamW kernel on CPU tensors.

Checks, against the torch ops of `optim._adamw_bf16_torch`: the moments (fp32, to rounding),
the weights (stochastic rounding lands on a bf16 neighbour of the exact result, never
further), the gradient scale, tensors that do not fill their last block, and that the
rounding is unbiased. Prints "ok" when all hold.
"""
from __future__ import annotations

import torch

from tunesmith.train import _optim_triton as kernel
from tunesmith.train import optim
from tunesmith.train.optim import _adamw_bf16_torch, block_table


def launch(tensors: list[torch.Tensor], sizes: list[int], scale: torch.Tensor | None, **kw: float) -> None:
    kernel.adamw_bf16_sr(tensors, torch.tensor(sizes), block_table(sizes, kernel.BLOCK), scale, seed=7, **kw)


def main() -> None:
    torch.manual_seed(0)
    sizes = [5000, 1, 8192, 8193, 17000, 4096]
    ps = [torch.randn(n).to(torch.bfloat16) for n in sizes]
    gs = [torch.randn(n).to(torch.bfloat16) for n in sizes]
    ms, vs = [torch.randn(n) for n in sizes], [torch.randn(n).abs() for n in sizes]
    refs = [(p.clone(), m.clone(), v.clone()) for p, m, v in zip(ps, ms, vs)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3)
    scale = torch.tensor(0.37)
    launch(ps + gs + ms + vs, sizes, scale, **kw)
    for (rp, rm, rv), p, g, m, v in zip(refs, ps, gs, ms, vs):
        _adamw_bf16_torch(rp, g, rm, rv, generator=None, grad_scale=scale, **kw)
        torch.testing.assert_close(m, rm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-7)
        ulp = rp.float().abs() * 2**-7 + 1e-30
        worst = float(((p.float() - rp.float()).abs() / ulp).max())
        assert worst <= 1.0, f"tensor of {p.numel()}: {worst} ulp from the exact update"
        assert bool(p.float().isfinite().all())

    # tensors that do not start on 16 bytes (views one element into a buffer): the unhinted launch
    bufs = [torch.randn(n + 1).to(torch.bfloat16) for _ in range(2) for n in sizes]
    bufs += [torch.randn(n + 1) for n in sizes] + [torch.randn(n + 1).abs() for n in sizes]
    views = [b[1:] for b in bufs]
    assert not kernel.element_deltas([t.data_ptr() for t in views], len(sizes), views[0].data_ptr(),
                                     views[2 * len(sizes)].data_ptr())[1]
    assert kernel.element_deltas([t.data_ptr() for t in ps + gs + ms + vs], len(sizes), ps[0].data_ptr(),
                                 ms[0].data_ptr())[1] == all(t.data_ptr() % 16 == 0 for t in ps + gs + ms + vs)
    k = len(sizes)
    refs = [(p.clone(), m.clone(), v.clone()) for p, m, v in zip(views[:k], views[2 * k:3 * k], views[3 * k:])]
    heads = [b[0].clone() for b in bufs]  # the element before each view: must stay as it was
    launch(views, sizes, None, **kw)
    for (rp, rm, rv), p, g, m, v in zip(refs, views[:k], views[k:2 * k], views[2 * k:3 * k], views[3 * k:]):
        _adamw_bf16_torch(rp, g, rm, rv, generator=None, grad_scale=None, **kw)
        torch.testing.assert_close(m, rm, rtol=1e-5, atol=1e-6)
        worst = float(((p.float() - rp.float()).abs() / (rp.float().abs() * 2**-7 + 1e-30)).max())
        assert worst <= 1.0, f"unaligned tensor of {p.numel()}: {worst} ulp from the exact update"
    assert all(bool(b[0] == h) for b, h in zip(bufs, heads))

    # unbiased: 1 - 2**-10 lies a quarter of the way from 1 down to its bf16 neighbour 1 - 2**-8
    n = 40_000
    x, g = torch.ones(n, dtype=torch.bfloat16), torch.ones(n, dtype=torch.bfloat16)
    m, v = torch.zeros(n), torch.zeros(n)
    launch([x, g, m, v], [n], None, lr=2**-10, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0, step=1)
    assert set(x.float().unique().tolist()) == {1.0 - 2**-8, 1.0}
    mean = x.float().mean().item()
    assert abs(mean - (1.0 - 2**-10)) < 5e-5, mean

    # the optimizer's own launch (address and block tables, buckets), one step at a time
    # against the torch ops from the same weights and moments
    optim._triton_ok = lambda device_type: True
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in (3, 4096, 6000)]
    opt = optim.AdamWBF16(params, lr=1e-2, weight_decay=0.1)
    refs = [(p.detach().clone(), torch.zeros(p.numel()), torch.zeros(p.numel())) for p in params]
    for step in (1, 2):
        for p, (rp, rm, rv) in zip(params, refs):
            p.grad = torch.randn_like(p)
            p.data.copy_(rp)
            _adamw_bf16_torch(rp, p.grad, rm, rv, generator=None, grad_scale=scale, lr=1e-2, beta1=0.9,
                              beta2=0.999, eps=1e-8, weight_decay=0.1, step=step)
        opt.step(grad_scale=scale)
        for p, (rp, rm, _) in zip(params, refs):
            torch.testing.assert_close(opt.state[p]["exp_avg"], rm, rtol=1e-5, atol=1e-6)
            worst = float(((p.detach().float() - rp.float()).abs() / (rp.float().abs() * 2**-7 + 1e-30)).max())
            assert worst <= 1.0, f"optimizer step {step}, tensor of {p.numel()}: {worst} ulp"
    print("ok")


if __name__ == "__main__":
    main()
