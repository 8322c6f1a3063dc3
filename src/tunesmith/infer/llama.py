"""A small Llama decoder for inference, so `generate` and `chat` start without transformers' model code.

Importing transformers' Llama modelling pulls in torch._dynamo and torch.distributed.tensor
(about 2 s of a 4.3 s start on two cores), before a 14M-parameter starter model spends
50 ms answering. A checkpoint that is exactly a plain Llama (`LlamaForCausalLM`, default
RoPE, SiLU MLP, no biases, one `model.safetensors`) loads here instead: the same weights
from safetensors, the same arithmetic (RMSNorm in fp32, RoPE, grouped-query attention
through SDPA, KV cache), checked against transformers' own forward in the tests. Anything
else (other architectures or RoPE scalings, adapters, sharded or quantised weights, hub
ids) returns None and goes through transformers as before.

`LlamaDecoder.generate` takes the subset of `model.generate`'s arguments that
`infer.generate` passes (input ids, mask, a GenerationConfig, our logits processors, a
streamer, stopping criteria) and decodes greedily or by sampling exactly as transformers'
sampling loop does: processors on fp32 logits, then argmax or one multinomial draw.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class LlamaShape:
    """The config.json numbers the decoder needs (and the context window `infer.generate` reads)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool


def plain_llama_shape(config: dict[str, Any]) -> LlamaShape | None:
    """The shape of a config that is exactly a plain Llama, or None when anything would compute differently."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    theta = rope.get("rope_theta", config.get("rope_theta")) if isinstance(rope, dict) else None
    plain = (config.get("architectures") == ["LlamaForCausalLM"] and config.get("model_type") == "llama"
             and config.get("hidden_act", "silu") == "silu" and rope_type == "default" and theta is not None
             and not config.get("attention_bias") and not config.get("mlp_bias")
             and config.get("pretraining_tp", 1) == 1 and "quantization_config" not in config)
    if not plain:
        return None
    heads = config["num_attention_heads"]
    return LlamaShape(config["hidden_size"], config["num_hidden_layers"], heads,
                      config.get("num_key_value_heads") or heads,
                      config.get("head_dim") or config["hidden_size"] // heads, config.get("rms_norm_eps", 1e-6),
                      float(theta), config.get("max_position_embeddings", 2048),
                      config.get("tie_word_embeddings", False))


def load_plain_llama(source: str, device: torch.device, dtype: torch.dtype) -> LlamaDecoder | None:
    """A `LlamaDecoder` for a local plain-Llama directory with one safetensors file, else None."""
    path = Path(source)
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file() or (path / "adapter_config.json").exists():
        return None
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    shape = plain_llama_shape(config)
    if shape is None:
        return None
    from safetensors.torch import load_file

    weights = {k: v.to(device=device, dtype=dtype) for k, v in load_file(str(path / WEIGHTS)).items()}
    if shape.tie_word_embeddings and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    if any(name not in weights for name in expected_weights(shape)):
        return None  # named differently (another converter): transformers knows how to map it
    generation = path / "generation_config.json"
    eos = (json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id") if generation.is_file()
           else config.get("eos_token_id"))
    return LlamaDecoder(shape, weights, device, eos)


def expected_weights(shape: LlamaShape) -> list[str]:
    """The tensor names the decoder reads, as transformers' LlamaForCausalLM saves them."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(shape.num_hidden_layers):
        names += [f"model.layers.{i}.{part}.weight" for part in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    return names


@dataclass
class _Config:
    """What `infer.generate` reads from `model.config` and `model.generation_config`."""

    max_position_embeddings: int
    eos_token_id: int | list[int] | None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, scaled by the weight in the input's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, heads, T, D): each half of D rotated against the other."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class LlamaDecoder:
    """Plain-Llama weights and a KV-cached forward; `generate` mirrors transformers' sampling loop."""

    def __init__(self, shape: LlamaShape, weights: dict[str, torch.Tensor], device: torch.device,
                 eos_token_id: int | list[int] | None) -> None:
        self.shape, self.weights, self.device = shape, weights, device
        self.config = _Config(shape.max_position_embeddings, eos_token_id)
        self.generation_config = self.config
        half = torch.arange(0, shape.head_dim, 2, dtype=torch.int64, device=device).float() / shape.head_dim
        self.inv_freq = 1.0 / (shape.rope_theta ** half)  # (D/2,)

    def parameters(self) -> list[torch.Tensor]:
        """The weight tensors (tied embeddings once), for counting."""
        return list({id(t): t for t in self.weights.values()}.values())

    def eval(self) -> LlamaDecoder:
        """Always in inference mode (no dropout to switch off)."""
        return self

    def _attention(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                   cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Self-attention of layer i on h (B, T, H), appending this step's keys/values to the cache."""
        s, w, prefix = self.shape, self.weights, f"model.layers.{i}.self_attn."
        b, t, _ = h.shape
        q = F.linear(h, w[prefix + "q_proj.weight"]).view(b, t, s.num_attention_heads, s.head_dim).transpose(1, 2)
        k = F.linear(h, w[prefix + "k_proj.weight"]).view(b, t, s.num_key_value_heads, s.head_dim).transpose(1, 2)
        v = F.linear(h, w[prefix + "v_proj.weight"]).view(b, t, s.num_key_value_heads, s.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if len(cache) > i:
            k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)  # (B, kv, S, D)
            cache[i] = (k, v)
        else:
            cache.append((k, v))
        groups = s.num_attention_heads // s.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, heads, S, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, T, D)
        return F.linear(out.transpose(1, 2).reshape(b, t, -1), w[prefix + "o_proj.weight"])

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Logits (B, T, V) of ids (B, T) at positions (B, T); mask (B, 1, T, S) is True where a query may look."""
        s, w = self.shape, self.weights
        h = F.embedding(ids, w["model.embed_tokens.weight"])  # (B, T, H)
        freqs = positions[:, :, None].float() * self.inv_freq  # (B, T, D/2), in fp32 as transformers does
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
        for i in range(s.num_hidden_layers):
            prefix = f"model.layers.{i}."
            h = h + self._attention(i, _rms_norm(h, w[prefix + "input_layernorm.weight"], s.rms_norm_eps),
                                    cos, sin, mask, cache)
            x = _rms_norm(h, w[prefix + "post_attention_layernorm.weight"], s.rms_norm_eps)
            gate = F.silu(F.linear(x, w[prefix + "mlp.gate_proj.weight"]))
            h = h + F.linear(gate * F.linear(x, w[prefix + "mlp.up_proj.weight"]), w[prefix + "mlp.down_proj.weight"])
        h = _rms_norm(h, w["model.norm.weight"], s.rms_norm_eps)
        return F.linear(h, w["lm_head.weight"])

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config: Any,
                 logits_processor: Any = (), streamer: Any = None, stopping_criteria: Any = ()) -> torch.Tensor:
        """Prompt + new ids (B, T + new) of left-padded prompts, as `model.generate` returns them.

        Rows that produced a stop id are padded afterwards; decoding ends when every row has
        stopped, a stopping criterion says so, or max_new_tokens is reached.
        """
        config = generation_config
        if getattr(config, "num_beams", 1) != 1:
            raise ValueError("LlamaDecoder decodes one beam")
        stops = torch.tensor(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id],
                             device=self.device)
        keep = attention_mask.bool()  # (B, S): which key positions are real tokens
        positions = (keep.long().cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt counts from 0
        width = input_ids.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        mask = (causal[None] & keep[:, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)  # pads see themselves
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        logits = self.forward(input_ids, positions, mask[:, None], cache)[:, -1]  # (B, V)
        ids, running = input_ids, torch.ones(input_ids.shape[0], dtype=torch.bool, device=self.device)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for step in range(config.max_new_tokens):
            scores = logits.float()
            for processor in logits_processor:
                scores = processor(ids, scores)
            token = (torch.multinomial(F.softmax(scores, dim=-1), 1).squeeze(1) if config.do_sample
                     else scores.argmax(-1))  # (B,)
            token = torch.where(running, token, torch.full_like(token, config.pad_token_id))
            ids = torch.cat([ids, token[:, None]], dim=1)
            if streamer is not None:
                streamer.put(token.cpu())
            running &= ~torch.isin(token, stops)
            for criterion in stopping_criteria:
                running &= ~criterion(ids, scores)
            if not running.any() or step == config.max_new_tokens - 1:
                break
            keep = torch.cat([keep, torch.ones_like(keep[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            logits = self.forward(token[:, None], positions, keep[:, None, None, :], cache)[:, -1]
        if streamer is not None:
            streamer.end()
        return ids
