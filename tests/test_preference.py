"""Preference pairs: rendering as inference does, pre-flight, one-forward collation, and DPO / ORPO
losses and gradients against the published formulas computed independently here (one sequence at
a time, plain log_softmax), plus packing / padding / accumulation parity."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tunesmith.config import DataOptions
from tunesmith.data.conversation import Conversation, Turn
from tunesmith.data.packing import collate_pairs
from tunesmith.data.pairs import tokenize_pairs
from tunesmith.data.readers import read_conversations
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.errors import UserError
from tunesmith.train.preference import make_dpo_loss, make_orpo_loss

PAIRS = [("What is two plus two?", "Two plus two equals four.", "Five."),
         ("Say hello", "Hello world!", "No."),
         ("Name a pet", "A small cat.", "A big red stone tree river."),
         ("What color is the sky?", "The sky is blue.", "The sky is green, of course.")]


def convs(pairs=PAIRS, system: str | None = None) -> list[Conversation]:
    head = [Turn("system", system)] if system else []
    return [Conversation(turns=head + [Turn("user", q)], chosen=[Turn("assistant", c)],
                         rejected=[Turn("assistant", r)], source=f"p.jsonl:{n}")
            for n, (q, c, r) in enumerate(pairs, start=1)]


@pytest.fixture(scope="module")
def models(llama3_tokenizer, one_thread):
    """A tiny policy and a different tiny reference (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(llama3_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    with torch.no_grad():
        policy.get_input_embeddings().weight.mul_(20)  # confident logits, as a pretrained model has
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def test_reply_is_rendered_as_inference_renders_it(llama3_tokenizer):
    pairs, _ = tokenize_pairs(convs(system="Be brief."), llama3_tokenizer, DataOptions())
    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for pair, (q, c, r) in zip(pairs, PAIRS):
        prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
        p_ids = llama3_tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
        for seq, reply in zip(pair.sequences(), (c, r)):
            assert seq.input_ids[:len(p_ids)] == p_ids and all(x == IGNORE_INDEX for x in seq.labels[:len(p_ids)])
            target = seq.input_ids[len(p_ids):]
            assert seq.labels[len(p_ids):] == target and target[-1] == eot  # trained through end-of-turn
            full = llama3_tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}],
                                                        tokenize=False)
            assert full.startswith(llama3_tokenizer.decode(seq.input_ids))


def test_shared_prefix_multi_turn_and_system_shapes_are_read(tmp_path: Path):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Capital of France?"}]
    rows = [{"chosen": turns + [{"role": "assistant", "content": "Paris."}],  # Anthropic-HH / UltraFeedback
             "rejected": turns + [{"role": "assistant", "content": "Rome."}]},
            {"prompt": turns, "chosen": "Paris.", "rejected": "Rome.", "system": "Be brief."}]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    first, second = read_conversations(str(data))[0]
    assert [t.content for t in first.turns] == ["Hi", "Hello.", "Capital of France?"]
    assert first.chosen == [Turn("assistant", "Paris.")] and first.rejected == [Turn("assistant", "Rome.")]
    assert second.turns[0] == Turn("system", "Be brief.") and len(second.turns) == 4


def test_preflight_refuses_identical_pairs_and_prompts_without_room(llama3_tokenizer):
    bad = convs([("q one", "same", "same"), ("a b c " * 40, "x", "y"), ("ok", "yes", "no")])
    with pytest.raises(UserError, match="2 of 3 preference pairs cannot train") as info:
        tokenize_pairs(bad, llama3_tokenizer, DataOptions(max_length=64))
    problems = "\n".join(info.value.problems)
    assert "p.jsonl:1: chosen and rejected replies are identical" in problems
    assert "p.jsonl:2: the prompt alone has" in problems and "--max-length 64" in problems
    pairs, report = tokenize_pairs(bad, llama3_tokenizer, DataOptions(max_length=64, skip_invalid=True))
    assert [p.source for p in pairs] == ["p.jsonl:3"] and len(report.dropped) == 2
    with pytest.raises(UserError, match="--train-on-prompt does not apply to preference objectives"):
        tokenize_pairs(convs(), llama3_tokenizer, DataOptions(train_on_prompt=True))


def test_a_reply_that_does_not_fit_is_truncated_never_the_prompt(llama3_tokenizer):
    long = convs([("Say hello", "hello " * 60, "no " * 60)])
    full, _ = tokenize_pairs(long, llama3_tokenizer, DataOptions(max_length=2048))
    cut, report = tokenize_pairs(long, llama3_tokenizer, DataOptions(max_length=48))
    (c_full, r_full), (c_cut, r_cut) = full[0].sequences(), cut[0].sequences()
    assert report.truncated == 1 and len(c_cut.input_ids) == len(r_cut.input_ids) == 48
    assert c_cut.input_ids == c_full.input_ids[:48] and r_cut.input_ids == r_full.input_ids[:48]


def seq_logp(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """Independent: sum of log p(label[i] | ids[:i]) over trained positions, one sequence alone."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    total, count = torch.zeros(()), 0
    for i, label in enumerate(labels[1:]):
        if label != IGNORE_INDEX:
            total, count = total + logp[i, label], count + 1
    return total, count


def independent(policy, reference, pairs, beta: float, kind: str) -> torch.Tensor:
    """The published losses, averaged over pairs. DPO (Rafailov et al. 2023, eq. 7); ORPO (Hong et al. 2024)."""
    losses = []
    for pair in pairs:
        (c, nc), (r, nr) = (seq_logp(policy, s.input_ids, s.labels) for s in pair.sequences())
        if kind == "dpo":
            with torch.no_grad():
                (rc, _), (rr, _) = (seq_logp(reference, s.input_ids, s.labels) for s in pair.sequences())
            losses.append(-torch.nn.functional.logsigmoid(beta * ((c - rc) - (r - rr))))
        else:
            pc, pr = torch.exp(c / nc), torch.exp(r / nr)  # mean token probability... as odds p/(1-p)
            log_or = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
            losses.append(-c / nc - beta * torch.nn.functional.logsigmoid(log_or))
    return torch.stack(losses).mean()


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_loss_and_gradients_equal_the_published_formula(models, llama3_tokenizer, kind):
    from tunesmith.train.reference import attach, score_pairs

    policy, reference = models
    pairs, _ = tokenize_pairs(convs(), llama3_tokenizer, DataOptions())
    attach(pairs, score_pairs(reference, pairs, 4096, torch.device("cpu")))
    loss_fn = make_dpo_loss(0.5) if kind == "dpo" else make_orpo_loss(0.3)
    policy.zero_grad(set_to_none=True)
    result = loss_fn(policy, collate_pairs(pairs))
    (result.total / result.count).backward()
    ours = grads(policy)
    expected = independent(policy, reference, pairs, 0.5 if kind == "dpo" else 0.3, kind)
    expected.backward()
    theirs = grads(policy)
    assert result.count == len(pairs)
    assert abs(float(result.total.detach()) / result.count - float(expected.detach())) <= 1e-5
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_packing_padding_and_accumulation_match_single_pairs(models, llama3_tokenizer, kind):
    from tunesmith.train.loop import accumulate
    from tunesmith.train.reference import attach, score_pairs

    policy, reference = models
    pairs, _ = tokenize_pairs(convs(), llama3_tokenizer, DataOptions())
    attach(pairs, score_pairs(reference, pairs, 4096, torch.device("cpu")))
    loss_fn = make_dpo_loss(0.1) if kind == "dpo" else make_orpo_loss(0.1)
    cpu = torch.device("cpu")
    layouts = {"packed": [collate_pairs(pairs)], "padded": [collate_pairs(pairs, padded=True, pad_id=0)],
               "accumulated": [collate_pairs(pairs[:1]), collate_pairs(pairs[1:3], padded=True), collate_pairs(pairs[3:])]}
    singles = []
    for pair in pairs:  # each pair alone, averaged by hand
        result = loss_fn(policy, collate_pairs([pair]))
        (result.total / len(pairs)).backward()
        singles.append(float(result.total.detach()))
    expected_loss, expected_grads = sum(singles) / len(pairs), grads(policy)
    for name, batches in layouts.items():
        loss, metrics, units = accumulate(policy, batches, loss_fn, cpu)
        assert units == len(pairs) and abs(float(loss) - expected_loss) <= 1e-5, name
        assert 0.0 <= float(metrics["reward_accuracy"]) <= 1.0
        for a, b in zip(grads(policy), expected_grads):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_lora_reference_is_the_base_with_the_adapter_off(models, llama3_tokenizer):
    from peft import LoraConfig, get_peft_model

    from tunesmith.train.preference import reference_logps, sequence_logps

    base = copy.deepcopy(models[0])
    pairs, _ = tokenize_pairs(convs(), llama3_tokenizer, DataOptions())
    batch = collate_pairs(pairs)
    with torch.no_grad():
        expected = sequence_logps(base, batch)[0]
        lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        tuned = sequence_logps(lora, batch)[0]
    assert not torch.allclose(tuned, expected, atol=1e-3)  # the adapter does change the model
    assert torch.allclose(reference_logps(lora, batch), expected, atol=1e-5)
    rewards = make_dpo_loss(0.1)(lora, batch).metrics
    assert set(rewards) == {"reward_accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logp",
                            "rejected_logp"}


def test_fused_log_probs_equal_the_plain_ones_with_gradients(models, llama3_tokenizer):
    from tunesmith.train.preference import fused_sequence_logps, sequence_logps

    policy = models[0]
    pairs, _ = tokenize_pairs(convs(), llama3_tokenizer, DataOptions())
    batch = collate_pairs(pairs)
    results = []
    for fn in (sequence_logps, fused_sequence_logps):
        policy.zero_grad(set_to_none=True)
        logps, counts = fn(policy, batch)
        logps.sum().backward()
        results.append((logps.detach(), counts, grads(policy)))
    (a, ca, ga), (b, cb, gb) = results
    assert torch.equal(ca, cb) and torch.allclose(a, b, atol=1e-4, rtol=1e-5)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4)


def test_fused_log_probs_pad_every_pair_batch_to_the_token_budget(models, llama3_tokenizer):
    """One row length per run (the budget) is what keeps the compiled layers from recompiling per step."""
    from types import SimpleNamespace

    from tunesmith.train.preference import fused_sequence_logps, logps_for, sequence_logps

    policy = models[0]
    pairs, _ = tokenize_pairs(convs(), llama3_tokenizer, DataOptions())
    seen: list[int] = []
    decoder = policy.get_decoder()
    hook = decoder.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        budget = 1024
        fn = logps_for(SimpleNamespace(loss_sum=object(), batch_tokens=budget))
        plain = []
        for group in (pairs[:1], pairs[:2], pairs[1:]):
            batch = collate_pairs(group)
            assert batch.input_ids.shape[1] < budget
            with torch.no_grad():
                got = fn(policy, batch)[0]
                plain.append(torch.allclose(got, sequence_logps(policy, batch)[0], atol=1e-4))
        assert seen[::2] == [budget] * 3 and all(plain)  # every other call is the plain reference
        assert logps_for(SimpleNamespace(loss_sum=None)) is sequence_logps
        assert fused_sequence_logps(policy, collate_pairs(pairs[:1]))[0].shape == (1, 2)
    finally:
        hook.remove()
