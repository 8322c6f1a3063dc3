"""Preference pairs -> TokenizedPair: the prompt rendered once per reply, each reply masked as SFT masks it.

A pair trains two sequences, prompt + chosen reply and prompt + rejected reply. Each is
rendered the way inference renders it (`render_reply`): the prompt P is the chat template
with the generation prompt, and the reply target is what the template adds after P up to
and including its end-of-turn token; its ids are P's ids followed by the target's ids, so
the trained tokens are exactly the ones the model emits after P at inference.

Both sequences sit in one `TokenizedPair` (chosen first), so the loop's token-budget
grouping, the cache and the collator treat a pair as one unit; `collate_pairs`
(data.packing) puts both in ONE forward as two documents.

Pre-flight: a pair whose chosen and rejected replies are identical, or whose prompt leaves
no room for a reply within --max-length, is refused (counted, FILE:LINE), or skipped with
--skip-invalid. A reply that does not fit is truncated (counted), never the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunesmith.data.conversation import Conversation, Turn
from tunesmith.data.templates import Renderer, end_of_turn_ids
from tunesmith.data.tokenize import IGNORE_INDEX, TemplateMismatch, TokenizedSample, TokenizeReport
from tunesmith.errors import UserError

if TYPE_CHECKING:
    from tunesmith.config import DataOptions

MAX_LISTED = 20


@dataclass
class TokenizedPair:
    """Two sequences of one prompt: chosen (the first `chosen_length` ids) then rejected.

    `labels` are IGNORE_INDEX on both copies of the prompt. `reference` holds the reference
    model's summed log-probs of (chosen, rejected) once a reference pass has computed them.
    """

    input_ids: list[int]
    labels: list[int]
    chosen_length: int
    source: str = ""
    reference: tuple[float, float] | None = None

    def sequences(self) -> tuple[TokenizedSample, TokenizedSample]:
        """(prompt + chosen, prompt + rejected) as two plain samples."""
        n = self.chosen_length
        return (TokenizedSample(self.input_ids[:n], self.labels[:n], self.source),
                TokenizedSample(self.input_ids[n:], self.labels[n:], self.source))

    @property
    def num_trained(self) -> int:
        """Trained tokens of both replies."""
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def render_reply(renderer: Renderer, eot_strings: list[str], prompt: list[dict[str, str]],
                 reply: list[dict[str, str]], source: str) -> tuple[str, str]:
    """(P, target): the inference prompt, and what the template adds after it through the end-of-turn token.

    The same rule SFT trains by; the reply text is never searched for in the rendering.
    """
    p = renderer.render(prompt, add_generation_prompt=True)
    full = renderer.render(prompt + reply)
    if not full.startswith(p):
        raise TemplateMismatch(
            f"{source}: the chat template renders the assistant turn differently at inference "
            "(add_generation_prompt=True) than in training",
            [f"inference prompt ends with: {p[-60:]!r}",
             "fix: pick a consistent template with --template (llama3 | chatml | zephyr | alpaca | plain)"])
    target = full[len(p):]
    ends = [target.rfind(s) + len(s) for s in eot_strings if s and s in target]
    return p, target[:max(ends)] if ends else target


def _messages(turns: list[Turn]) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in turns]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts, no special tokens added (the template wrote them)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _pair(tokenizer: Any, prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
          source: str, report: TokenizeReport) -> TokenizedPair | str:
    """One pair from its token ids, or the reason it cannot train."""
    bos = tokenizer.bos_token_id
    if bos is not None and prompt[:2] == [bos, bos]:
        prompt = prompt[1:]  # a template that writes BOS, tokenized by a tokenizer that adds one
    report.lengths.append(len(prompt) + max(len(chosen), len(rejected)))
    room = max_length - len(prompt)
    if room <= 0:
        return (f"{source}: the prompt alone has {len(prompt)} tokens, leaving no room for a reply within "
                f"--max-length {max_length}")
    if len(chosen) > room or len(rejected) > room:
        report.truncated += 1
        chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        return f"{source}: chosen and rejected replies are identical (nothing to prefer)"
    ids = prompt + chosen + prompt + rejected
    masked = [IGNORE_INDEX] * len(prompt)
    labels = masked + chosen + masked + rejected
    report.tokens += len(ids)
    report.trained_tokens += len(chosen) + len(rejected)
    return TokenizedPair(ids, labels, len(prompt) + len(chosen), source)


def tokenize_pairs(convs: list[Conversation], tokenizer: Any, options: DataOptions) -> tuple[
        list[TokenizedPair], TokenizeReport]:
    """Tokenize preference conversations; refuse (or with --skip-invalid, skip and count) pairs that cannot train.

    The objectives' `tokenize` hook. The prompt is never trained (--train-on-prompt is refused).
    """
    if options.train_on_prompt:
        raise UserError("--train-on-prompt does not apply to preference objectives (the prompt is the same "
                        "in both sequences of a pair, so it carries no preference)", ["fix: drop --train-on-prompt"])
    wrong = sorted({c.kind for c in convs} - {"preference"})
    if wrong:
        raise UserError(f"{', '.join(wrong)} samples mixed into preference data (every row needs chosen and rejected)")
    renderer = Renderer(tokenizer)
    eot = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    report, pairs, problems = TokenizeReport(), [], []
    texts: list[str] = []
    for conv in convs:
        prompt = _messages(conv.turns)
        p, chosen = render_reply(renderer, eot, prompt, _messages(conv.chosen or []), conv.source)
        _, rejected = render_reply(renderer, eot, prompt, _messages(conv.rejected or []), conv.source)
        texts += [p, chosen, rejected]
    ids = _encode(tokenizer, texts)
    for n, conv in enumerate(convs):
        made = _pair(tokenizer, *ids[3 * n:3 * n + 3], options.max_length, conv.source, report)
        if isinstance(made, str):
            problems.append(made)
        else:
            pairs.append(made)
    if problems and not options.skip_invalid:
        raise UserError(f"{len(problems)} of {len(convs)} preference pairs cannot train",
                        problems[:MAX_LISTED] + ["fix: remove or correct those rows, raise --max-length for long "
                                                 "prompts, or pass --skip-invalid to skip them"])
    report.dropped = problems
    report.samples = len(pairs)
    return pairs, report

