"""Methods as parameter sets: LoRA trains only the adapter, full trains everything."""
from __future__ import annotations

import pytest
import torch

from tunesmith.data.packing import pack
from tunesmith.data.tokenize import TokenizedSample
from tunesmith.errors import UserError
from tiny import trainable_state, with_method
from tunesmith.model.adapters import count_parameters, lora_target_modules
from tunesmith.train.losses import sft_loss_sum


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def one_step(model) -> None:
    batch = pack([TokenizedSample(list(range(5, 25)), list(range(5, 25)))], 1000)[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, n, _ = sft_loss_sum(model, batch)
    (loss / n).backward()
    optimizer.step()


def test_lora_trains_only_the_adapter_and_the_base_stays_frozen(tiny_model_dir):
    model = with_method(load(tiny_model_dir), "lora", lora_r=16, lora_alpha=32)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.0)
    names = set(trainable_state(model))
    assert names and all("lora_" in n for n in names)
    adapted = {n.split(".")[-4] for n in names}  # ...<module>.lora_A.default.weight
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    before = {n: p.clone() for n, p in model.named_parameters()}
    one_step(model)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        if "lora_B" in n:
            assert changed, n  # B starts at zero and must move
        elif "lora_" not in n:
            assert not changed, n
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_lora_target_list_and_a_bad_target(tiny_model_dir):
    assert lora_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    model = with_method(load(tiny_model_dir), "lora", lora_targets="q_proj,v_proj")
    assert {n.split(".")[-4] for n in trainable_state(model)} == {"q_proj", "v_proj"}
    with pytest.raises(UserError, match="lora-targets") as info:
        with_method(load(tiny_model_dir), "lora", lora_targets="nope_proj")
    assert "q_proj" in info.value.problems[0]  # the message lists the layers that do exist


def test_full_trains_every_weight(tiny_model_dir):
    model = with_method(load(tiny_model_dir), "full")
    trainable, total = count_parameters(model)
    assert trainable == total
    before = {n: p.clone() for n, p in model.named_parameters()}
    one_step(model)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "embed" not in n)
