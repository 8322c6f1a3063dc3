"""Builders for tiny offline test assets: BPE tokenizers trained on the fly and random Llama models.

Three tokenizer styles cover the template cases the data layer must get right:
- "llama3": Llama-3 special tokens, a template that trims content and marks assistant
  replies with {% generation %} (so HF's assistant mask can be compared against ours);
- "chatml": Qwen-style <|im_start|>/<|im_end|>, no BOS, no generation markers;
- "base": BOS/EOS only, no chat template and no pad token (a base model).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

# The starter model's own template (written by scripts/build_starter.py): Meta's Llama-3 layout,
# content trimmed, assistant replies inside {% generation %} markers.
LLAMA3_TEMPLATE = (Path(__file__).resolve().parent.parent / "src" / "tunesmith" / "assets" / "starter"
                   / "chat_template.jinja").read_text(encoding="utf-8")

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>", "<|finetune_right_pad_id|>"],
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "base": ["<s>", "</s>"],
}

WORDS = ("the a cat dog sun moon tree river stone bird fish red blue green small big quick slow "
         "answer question what why how is are was were you I we they it yes no hello world tell me "
         "about write tweet topic capital letters sarcastic sure of course great idea please thanks "
         "one two three four five six seven eight nine ten plus minus equals translate word verb").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Random English-ish sentences with punctuation, digits and capitals."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        line = " ".join(words).capitalize() + rng.choice([".", "!", "?", ","])
        lines.append(line + " " + line.upper() + f" {rng.randint(0, 999)}")
    return lines


def make_tokenizer(style: str = "llama3", vocab_size: int = 700) -> Any:
    """A fast HF tokenizer of the given style, trained in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    if style == "llama3":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
            pad_token="<|finetune_right_pad_id|>", chat_template=LLAMA3_TEMPLATE)
    if style == "chatml":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            chat_template=CHATML_TEMPLATE)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_model_dir(path: Path, style: str = "llama3", seed: int = 0, **shape: int) -> Path:
    """Save a tiny random Llama model (about 100k parameters) with its tokenizer to `path`;
    `shape` overrides LlamaConfig sizes (hidden_size=256 for llama.cpp's k-quant blocks)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(style)
    torch.manual_seed(seed)
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, **shape}
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=512, **sizes,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def with_method(model, method: str, **options):
    """`model` wrapped by the parameter set `method` of the registry (what `tunesmith train` does)."""
    from tunesmith.config import MethodOptions
    from tunesmith.methods import PARAMETER_SETS

    return PARAMETER_SETS[method].wrap(model, MethodOptions(method=method, **options))


def trainable_state(model) -> dict:
    """The trainable tensors by name (all weights, or only the adapter's)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
