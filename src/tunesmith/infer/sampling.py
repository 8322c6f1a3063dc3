"""Sampling options and the logits processors that give them their meaning.

Generation runs through `transformers`' `model.generate` (KV cache, batching, stopping),
but every knob that shapes the next-token distribution is one of OUR processors, so
the semantics are the ones written here and tested against hand-computed logits:

1. repetition penalty over the last N *generated* tokens only (the prompt is never
   penalised): a positive logit is divided by the penalty, a negative one multiplied,
   so the token always becomes less likely whatever the sign; as in the guides' own
   generate(), every occurrence in the window counts (a token seen twice is penalised
   twice: penalty ** 2);
2. temperature (logits / T);
3. top-k (keep the k largest logits);
4. top-p (keep the smallest set of tokens whose probability mass reaches p).

Greedy decoding applies only the repetition penalty, then takes the argmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunesmith.config import check
from tunesmith.errors import UserError

if TYPE_CHECKING:  # torch is imported where the processors run, so building the CLI parser stays fast
    import torch


@dataclass
class SamplingOptions:
    """How the next token is chosen, and how many are generated."""

    temperature: float = 0.7
    """Softmax temperature (> 0); lower is more focused, higher more varied."""
    top_k: int = 50
    """Sample only among the k most likely tokens (0 disables)."""
    top_p: float = 0.9
    """Sample only among the most likely tokens whose probabilities add up to p (0 < p <= 1; 1 disables)."""
    repetition_penalty: float = 1.0
    """Make tokens generated recently less likely: positive logits divided, negative multiplied (1 disables)."""
    repetition_penalty_range: int = 10
    """The repetition penalty looks at the last N generated tokens only (0: all generated tokens)."""
    max_new_tokens: int = 256
    """Generate at most this many new tokens per reply."""
    greedy: bool = False
    """Always take the most likely token (deterministic; ignores temperature, top-k and top-p)."""
    seed: int | None = None
    """Random seed for sampling; the same seed gives the same output."""

    def __post_init__(self) -> None:
        if not self.greedy:
            check(self.temperature > 0, "temperature", self.temperature, "> 0, or pass --greedy")
        check(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "0 < p <= 1")
        check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "> 0 (1 disables)")
        check(self.repetition_penalty_range >= 0, "repetition_penalty_range", self.repetition_penalty_range,
              "an integer >= 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")


def sampling_with(base: SamplingOptions | None, overrides: dict[str, object]) -> SamplingOptions:
    """`base` (or the defaults) with keyword overrides, validated again (API calls' `**sampling`)."""
    from dataclasses import asdict

    values = asdict(base or SamplingOptions())
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise UserError(f"unknown sampling option(s): {', '.join(unknown)} (known: {', '.join(values)})")
    values.update(overrides)
    return SamplingOptions(**values)


# --------------------------------------------------------------------------------------
# Processors. Each is called by `generate` as `processor(input_ids, scores) -> scores`
# with input_ids (B, T) = prompt + generated so far and scores (B, V) the next-token logits.


class RepetitionPenalty:
    """Penalise the token ids among the last `window` generated tokens, once per occurrence."""

    def __init__(self, penalty: float, window: int, prompt_length: int) -> None:
        self.penalty = penalty
        self.window = window  # 0: all generated tokens
        self.prompt_length = prompt_length  # prompts are left-padded to one length, so this is shared

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        generated = input_ids[:, self.prompt_length:]  # (B, G)
        if self.window:
            generated = generated[:, -self.window:]
        if generated.shape[1] == 0 or self.penalty == 1.0:
            return scores
        ones = torch.ones_like(generated, dtype=scores.dtype)
        counts = torch.zeros_like(scores).scatter_add_(1, generated, ones)  # (B, V) occurrences in the window
        factor = self.penalty ** counts  # (B, V); 1 where a token did not occur
        return torch.where(scores > 0, scores / factor, scores * factor)


class Temperature:
    """Divide the logits by the temperature."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the k largest logits of each row (ties with the k-th are kept too); the rest -> -inf."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]  # (B, 1)
        return scores.masked_fill(scores < kth, float("-inf"))


class TopP:
    """Keep the smallest set of most likely tokens whose total probability reaches p (at least one)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # (B, V)
        probs = sorted_scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = mass_before >= self.p  # the top token has mass_before 0 and is always kept
        drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
        return scores.masked_fill(drop, float("-inf"))


def build_processors(options: SamplingOptions, prompt_length: int) -> list:
    """The processors for `options`, in the order the module docstring gives."""
    processors: list = []
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(options.repetition_penalty, options.repetition_penalty_range,
                                            prompt_length))
    if options.greedy:
        return processors
    if options.temperature != 1.0:
        processors.append(Temperature(options.temperature))
    if options.top_k:
        processors.append(TopK(options.top_k))
    if options.top_p < 1.0:
        processors.append(TopP(options.top_p))
    return processors
