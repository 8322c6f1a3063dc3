"""CUDA graphs over the decoder (`model/graphs.py`): the bookkeeping around the recordings, on the CPU.

A CUDA graph replays recorded kernels on the same (static) tensors. `Rerun` stands in for it:
a replay re-runs the recorded function and writes what it returns into the tensors the
recording returned, so anything that keeps a reference to those tensors sees them change at
the next replay, as on the GPU. What this checks is ours: when a length is recorded, that
gradients accumulate over micro-batches although the graph's gradient buffers are rewritten
by every backward replay, and the fallbacks. That real graphs replay the same kernels is
checked on the GPU (bench/gpu_train.py --host-profile: loss parity of graphs on vs off).
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.data.packing import Batch
from tunesmith.model import fast, graphs
from tunesmith.train.loop import accumulate


class Rerun:
    """A stand-in graph: replay = run `fn` again and copy its results into the recorded tensors."""

    def __init__(self, fn, out) -> None:
        self.fn, self.out = fn, out

    def replay(self) -> None:
        with torch.enable_grad():  # a Function's forward runs without; a recording was made with
            fresh = self.fn()
        for static, new in zip(_flat(self.out), _flat(fresh)):
            if static is not None:
                with torch.no_grad():
                    static.copy_(new)


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


class RerunRecorder:
    def __init__(self) -> None:
        self.records = 0

    def warm_up(self, fn) -> None:
        fn()

    def record(self, fn):
        self.records += 1
        out = fn()
        return Rerun(fn, out), out


def _model(method: str, hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="sdpa", tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # a non-zero B, so every adapter weight gets a gradient
    return model


def _batch(seed: int, length: int = 24) -> Batch:
    """One packed row of two documents."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (1, length), generator=gen)
    half = length // 2
    pos = torch.cat([torch.arange(half), torch.arange(length - half)]).unsqueeze(0)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    targets[0, half - 1] = -100
    return Batch(input_ids=ids, targets=targets, position_ids=pos,
                 num_targets=int((targets != -100).sum()))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same_step(eager, graphed, micro, loss_fn, step: int) -> None:
    """One optimizer step's micro-batches through both models: the same loss, metrics and gradients."""
    want, want_metrics, _ = accumulate(eager, micro, loss_fn, torch.device("cpu"))
    got, got_metrics, _ = accumulate(graphed, micro, loss_fn, torch.device("cpu"))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_metrics, want_metrics)
    want_grads, got_grads = _grads(eager), _grads(graphed)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_recorded_decoder_accumulates_the_gradients_of_the_eager_one(method):
    """Three steps of two micro-batches each, one row length: the first two micro-batches run
    eagerly, the third is recorded, the rest replay. Every step's loss and gradients equal the
    eager model's, including the steps whose first micro-batch left `.grad` as the graph's buffer."""
    eager, graphed = _model(method), copy.deepcopy(_model(method))
    recorder = RerunRecorder()
    lm = fast.causal_lm(graphed)
    graphs.attach(lm, fast.eager_decoder_hidden, 24, recorder)
    assert graphs.attached(fast.causal_lm(eager)) is None
    loss_fn = fast.make_fused_loss(budget=24, use_liger=False)
    for step in range(3):
        _same_step(eager, graphed, [_batch(2 * step), _batch(2 * step + 1)], loss_fn, step)
        for model in (eager, graphed):
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-0.05)  # a plain SGD step: later steps see new weights
            model.zero_grad(set_to_none=True)
    assert recorder.records == 2  # forward and backward of the one length, recorded once
    assert len(graphs.attached(lm).recordings) == 1


def _pairs(seed: int) -> Batch:
    """Two preference pairs in one packed row of 32 tokens (prompt + chosen, prompt + rejected each)."""
    from tunesmith.data.packing import collate_pairs
    from tunesmith.data.pairs import TokenizedPair

    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(2):
        prompt, chosen, rejected = (torch.randint(0, 96, (n,), generator=gen).tolist() for n in (4, 5, 3))
        ids = prompt + chosen + prompt + rejected
        labels = [-100] * 4 + chosen + [-100] * 4 + rejected
        pairs.append(TokenizedPair(ids, labels, chosen_length=9))
    return collate_pairs(pairs)


def test_dpo_through_the_recorded_decoder_matches_the_eager_one():
    """DPO with an adapter: the policy's forward replays while the reference (the adapter off, no
    gradients) runs eagerly in between, and the chunked log-probs re-read the recorded output in
    backward. Losses and adapter gradients equal the eager model's over 2 micro-batches x 3 steps."""
    from tunesmith.train.preference import fused_sequence_logps, make_dpo_loss

    eager, graphed = _model("lora"), _model("lora")
    recorder = RerunRecorder()
    graphs.attach(fast.causal_lm(graphed), fast.eager_decoder_hidden, 40, recorder)
    loss_fn = make_dpo_loss(0.1, lambda model, batch: fused_sequence_logps(model, batch, budget=40))
    for step in range(3):
        _same_step(eager, graphed, [_pairs(2 * step), _pairs(2 * step + 1)], loss_fn, step)
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
    assert recorder.records == 2


def test_eval_and_rows_longer_than_the_budget_run_eagerly():
    model = _model("lora")
    recorder = RerunRecorder()
    lm = fast.causal_lm(model)
    attached = graphs.attach(lm, fast.eager_decoder_hidden, 24, recorder)
    loss_fn = fast.make_fused_loss(budget=24, use_liger=False)
    for _ in range(3):
        accumulate(model, [_batch(0, 24)], loss_fn, torch.device("cpu"))  # the budget's length: recorded at the third
    for _ in range(4):
        accumulate(model, [_batch(0, 32)], loss_fn, torch.device("cpu"))  # padded to 1024: eager
    model.eval()
    with torch.no_grad():
        loss_fn(model, _batch(1, 24))  # eval: eager
    assert list(attached.recordings) == [((1, 24), (1, 24), torch.int64, torch.int64, torch.device("cpu"))]
    assert recorder.records == 2


def test_a_recording_that_fails_switches_graphs_off_with_one_line(capsys):
    class Broken(RerunRecorder):
        def record(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    model, reference = _model("full"), _model("full")
    lm = fast.causal_lm(model)
    attached = graphs.attach(lm, fast.eager_decoder_hidden, 24, Broken())
    loss_fn = fast.make_fused_loss(budget=24, use_liger=False)
    for seed in range(4):
        got, _, _ = accumulate(model, [_batch(seed)], loss_fn, torch.device("cpu"))
        want, _, _ = accumulate(reference, [_batch(seed)], loss_fn, torch.device("cpu"))
        torch.testing.assert_close(got, want)
    assert attached.off and not attached.recordings
    err = capsys.readouterr().err
    assert err.count("CUDA graphs off") == 1 and "not permitted when stream is capturing" in err


def test_graphs_are_attached_only_on_cuda_and_a_copy_has_none():
    model = _model("lora")
    setup = fast.prepare_for_training(model, device=torch.device("cpu"), batch_tokens=64)
    assert not setup.graphs and graphs.attached(fast.causal_lm(model)) is None
    assert not fast.quantized(fast.causal_lm(model))
    graphs.attach(fast.causal_lm(model), fast.eager_decoder_hidden, 24, RerunRecorder())
    assert graphs.attached(fast.causal_lm(copy.deepcopy(model))) is None
    graphs.detach(fast.causal_lm(model))
    assert graphs.attached(fast.causal_lm(model)) is None


def test_direct_calls_outside_the_loop_never_record():
    """Only `accumulate` (inside `graphs.may_record`) records: a caller of the loss may still hold the
    last one's autograd graph, which would make a recording fail on the GPU."""
    model = _model("lora")
    recorder = RerunRecorder()
    graphs.attach(fast.causal_lm(model), fast.eager_decoder_hidden, 24, recorder)
    loss_fn = fast.make_fused_loss(budget=24, use_liger=False)
    held = None
    for seed in range(4):
        result = loss_fn(model, _batch(seed))
        result.total.backward()
        held = result  # noqa: F841  (what the loop never does)
    assert recorder.records == 0
    accumulate(model, [_batch(0)], loss_fn, torch.device("cpu"))  # the length's fifth sighting, in the loop
    assert recorder.records == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_real_graphs_train_as_the_eager_decoder_on_cuda():
    """On a GPU: the fast path with graphs (compiled layers, flex attention, liger's loss; the
    recording made at the third micro-batch) gives the losses of the same path without them,
    step for step, while a direct call of the loss holding the last one's graph never records."""
    from tunesmith.train.optim import make_optimizer

    device = torch.device("cuda")
    losses = {}
    for use_graphs in (False, True):
        torch.manual_seed(0)
        model = _model("lora", hidden=64).to(device)  # head dim 16: flex attention's smallest
        setup = fast.prepare_for_training(model, device=device, batch_tokens=128, cuda_graphs=use_graphs)
        assert setup.graphs == use_graphs
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        curve = []
        for step in range(6):
            first = setup.loss_sum(model, _batch(100 + step, 100).to(device))  # outside the loop: eager,
            first.total.backward()
            second = setup.loss_sum(model, _batch(200 + step, 100).to(device))  # also with `first` alive
            second.total.backward()
            del first, second  # the loop's side of the contract: nothing of them alive in `accumulate`
            optimizer.zero_grad(set_to_none=True)
            loss, _, _ = accumulate(model, [_batch(step, 100)], setup.loss_sum, device)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(float(loss))
        losses[use_graphs] = curve
        recorded = graphs.attached(fast.causal_lm(model))
        assert (recorded is not None) == use_graphs
        if use_graphs:
            assert recorded.off is None and len(recorded.recordings) == 1
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the caching allocator's streams need a CUDA GPU")
def test_the_warm_up_reuses_what_the_eager_steps_freed_on_cuda():
    """The side-stream warm-up maps no second set of activations beside the blocks the eager
    micro-batches freed for the default stream (the allocator gives a side stream none of them)."""
    size = 256 * 2**20
    activations = torch.empty(size, dtype=torch.uint8, device="cuda")  # an eager micro-batch's, then freed
    del activations
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    cached = torch.cuda.memory_reserved()
    assert cached >= size  # the freed block stays cached for the default stream
    graphs.CudaRecorder().warm_up(lambda: torch.empty(size, dtype=torch.uint8, device="cuda").fill_(1))
    assert torch.cuda.max_memory_reserved() < cached + size  # (without emptying first: both at once)
