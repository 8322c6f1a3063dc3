"""Conversation -> TokenizedSample: render with the chat template, mask all but what is trained.

How the mask is derived (exact for any template, never by searching for the answer):
for each assistant turn i, render `messages[:i]` with the generation prompt (what the
model sees at inference) and `messages[:i+1]`; the assistant's span is the text between
the two, cut right after its end-of-turn token (ChatML's trailing "\\n" is not trained).
The whole rendered text is then tokenized once (as `apply_chat_template` does, so the
ids match inference) and a token is trained when its character span overlaps a trained
span, the rule HF's `return_assistant_tokens_mask` uses. (Tokenizing the pieces one by
one would not do: SentencePiece-style tokenizers prepend "▁" to each piece.)
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from tunesmith.data.conversation import Conversation
from tunesmith.data.templates import Renderer, end_of_turn_ids
from tunesmith.errors import UserError

IGNORE_INDEX = -100
BATCH = 4096  # conversations per tokenizer call: big enough for Rust's parallelism, small enough to overlap
Spans = list[tuple[int, int]]  # [start, end) character ranges of the rendered text that are trained
Rendered = tuple[str, Spans]


@dataclass
class TokenizedSample:
    """Token ids and labels of one sample; labels are IGNORE_INDEX where nothing is trained.

    Labels are aligned with `input_ids` (not shifted): label[i] says whether token i is a
    training target. Shifting happens once, in packing.
    """

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    @property
    def num_trained(self) -> int:
        """How many tokens carry a loss."""
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


@dataclass
class TokenizeReport:
    """What tokenizing did: counts to print, and the samples it had to drop (never silently)."""

    samples: int = 0
    truncated: int = 0
    chunked_documents: int = 0
    untrained_turns: int = 0  # earlier assistant turns the template rewrites in history (not trained)
    dropped: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # token length of each sample before truncation
    tokens: int = 0
    trained_tokens: int = 0


class TemplateMismatch(UserError):
    """The template renders a turn differently at inference than in training."""


class SpanFinder:
    """Finds the trained character spans of rendered conversations (one template, many conversations)."""

    def __init__(self, tokenizer: Any) -> None:
        self.renderer = Renderer(tokenizer)
        self.eot_strings = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
        self.untrained_turns = 0  # assistant turns the template re-renders once later turns exist

    def spans(self, conv: Conversation, train_on_prompt: bool = False) -> Rendered:
        """The rendered conversation and the character spans of it that are trained."""
        messages = conv.messages()
        try:
            full = self.renderer.render(messages)
        except UserError as exc:
            raise UserError(f"{conv.source}: {exc}", exc.problems) from None
        if train_on_prompt:
            return full, [(0, len(full))]
        spans: Spans = []
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.renderer.render(messages[:i], add_generation_prompt=True)
            upto = full if i == last else self.renderer.render(messages[: i + 1])
            self._check_generation_prompt(conv, prompt, upto)
            if not full.startswith(upto):  # e.g. Qwen3 drops reasoning from history: the turn as
                self.untrained_turns += 1  # written in `full` is not what the model generates
                continue
            start = len(prompt)
            spans.append((start, start + self._cut_after_end_of_turn(upto[start:])))
        return full, spans

    def _check_generation_prompt(self, conv: Conversation, prompt: str, upto: str) -> None:
        """Training text must extend exactly what inference renders; else the mask is meaningless."""
        if not upto.startswith(prompt):
            raise TemplateMismatch(
                f"{conv.source}: the chat template renders the assistant turn differently at inference "
                "(add_generation_prompt=True) than in training",
                [f"inference prompt ends with: {prompt[-60:]!r}",
                 f"training text there: {upto[max(0, len(prompt) - 60):len(prompt) + 20]!r}",
                 "fix: pick a consistent template with --template (llama3 | chatml | zephyr | alpaca | plain)"])

    def _cut_after_end_of_turn(self, span: str) -> int:
        """Length of `span` up to and including its last end-of-turn token (all of it if none)."""
        ends = [span.rfind(s) + len(s) for s in self.eot_strings if s and s in span]
        return max(ends) if ends else len(span)


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[Any]:
    """Encodings (.ids, .offsets, maybe .char_to_token) of many texts; no special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # Rust, parallel across texts
        return backend.encode_batch(texts, add_special_tokens=False)
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [SimpleNamespace(ids=i, offsets=o) for i, o in zip(out["input_ids"], out["offset_mapping"])]


def _labels(encoding: Any, spans: Spans) -> list[int]:
    """ids where the token overlaps a trained span, IGNORE_INDEX elsewhere (spans are sorted)."""
    ids = encoding.ids
    labels = [IGNORE_INDEX] * len(ids)
    if hasattr(encoding, "char_to_token"):  # fast: two lookups per span instead of a pass over offsets
        bounds = [(encoding.char_to_token(a), encoding.char_to_token(b - 1)) for a, b in spans if b > a]
        if all(first is not None and last is not None for first, last in bounds):
            for first, last in bounds:
                labels[first:last + 1] = ids[first:last + 1]
            return labels
    k = 0  # some characters belong to no token (a normalizer dropped them): walk the offsets
    for i, (start, end) in enumerate(encoding.offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            labels[i] = ids[i]
    return labels


def tokenize_conversation(conv: Conversation, tokenizer: Any, max_length: int,
                          train_on_prompt: bool = False) -> TokenizedSample:
    """One conversation -> one sample (text documents longer than max_length: the first chunk)."""
    samples, report = tokenize_all([conv], tokenizer, max_length, train_on_prompt)
    if not samples:
        raise UserError(f"{conv.source}: nothing left to train on after truncation to {max_length} tokens",
                        report.dropped)
    return samples[0]


def tokenize_all(convs: list[Conversation], tokenizer: Any, max_length: int,
                 train_on_prompt: bool = False) -> tuple[list[TokenizedSample], TokenizeReport]:
    """Tokenize many conversations in batches; text documents are split into chunks.

    Chat samples longer than `max_length` are truncated (counted); a sample left with no
    trained token is dropped and listed in the report, never trained on silently.
    Rendering (Python) of batch k+1 overlaps the Rust tokenizer's work on batch k.
    """
    if any(c.kind == "preference" for c in convs):
        raise UserError("preference data needs --method dpo (not available yet)")
    report = TokenizeReport()
    segmenter = SpanFinder(tokenizer) if any(c.kind == "chat" for c in convs) else None
    samples: list[TokenizedSample] = []
    pending: tuple[list[Conversation], list[Rendered], Future[Any]] | None = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        for first in range(0, len(convs), BATCH):
            batch = convs[first:first + BATCH]
            rendered = [(c.text or "", []) if c.kind == "text" else
                        segmenter.spans(c, train_on_prompt) for c in batch]  # type: ignore[union-attr]
            future = pool.submit(_encode_batch, tokenizer, [text for text, _ in rendered])
            if pending is not None:
                _assemble(*pending, tokenizer, max_length, samples, report)
            pending = (batch, rendered, future)
        if pending is not None:
            _assemble(*pending, tokenizer, max_length, samples, report)
    report.samples = len(samples)
    report.untrained_turns = segmenter.untrained_turns if segmenter is not None else 0
    return samples, report


def _assemble(batch: list[Conversation], rendered: list[Rendered], future: Future[Any], tokenizer: Any,
              max_length: int, samples: list[TokenizedSample], report: TokenizeReport) -> None:
    """Label each conversation's tokens from its trained spans, and add its sample(s)."""
    for conv, (_text, spans), encoding in zip(batch, rendered, future.result()):
        if conv.kind == "text":
            samples += _document_chunks(encoding.ids, tokenizer, max_length, conv.source, report)
        else:
            sample = TokenizedSample(encoding.ids, _labels(encoding, spans), conv.source)
            _add_chat_sample(sample, tokenizer, max_length, samples, report)


def _add_chat_sample(sample: TokenizedSample, tokenizer: Any, max_length: int,
                     samples: list[TokenizedSample], report: TokenizeReport) -> None:
    """Dedupe a doubled BOS, truncate, and keep the sample only if something is trained."""
    bos = tokenizer.bos_token_id
    if bos is not None and sample.input_ids[:2] == [bos, bos]:
        sample.input_ids, sample.labels = sample.input_ids[1:], sample.labels[1:]
    report.lengths.append(len(sample.input_ids))
    if len(sample.input_ids) > max_length:
        report.truncated += 1
        sample.input_ids, sample.labels = sample.input_ids[:max_length], sample.labels[:max_length]
    trained = len(sample.labels) - sample.labels.count(IGNORE_INDEX)
    if trained == 0:
        report.dropped.append(f"{sample.source}: no trained token left after truncation to {max_length} "
                              "tokens (raise --max-length or shorten the prompt)")
        return
    report.tokens += len(sample.input_ids)
    report.trained_tokens += trained
    samples.append(sample)


def _document_chunks(ids: list[int], tokenizer: Any, max_length: int, source: str,
                     report: TokenizeReport) -> list[TokenizedSample]:
    """A raw document as BOS + text + EOS, split (not truncated) into max_length chunks, all trained."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
    report.lengths.append(len(ids))
    if len(ids) > max_length:
        report.chunked_documents += 1
    chunks = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    chunks = [c for c in chunks if len(c) >= 2 or len(chunks) == 1]  # a 1-token tail predicts nothing
    report.tokens += sum(len(c) for c in chunks)
    report.trained_tokens += sum(len(c) for c in chunks)
    return [TokenizedSample(list(c), list(c), source) for c in chunks]
