"""Conversation -> TokenizedSample: train exactly what inference asks the model to write.

Ground truth is inference (see `tunesmith.data.turns`): for assistant turn i the model is
given P = render(messages[:i], add_generation_prompt=True), tokenized on its own, and must
write the turn's target through its end-of-turn token. The labels are the target's ids right
after P's ids, tokenized as inference does: P, then the target, never one string re-split
where the two meet (a BPE merge across that boundary, e.g. Qwen's "\n" + a reply starting
"\n\n", would put a label on a token the model never has to produce).

A conversation is ONE sample when, at every assistant turn, the ids before it are exactly P's
ids as inference tokenizes P. Otherwise (templates that rewrite history, like Qwen3 dropping
earlier turns' reasoning, or Mistral-Nemo moving the system prompt to the last user turn) it
is split into as few samples as keep that true; splits and system-prompt folds are counted,
refusals name sample, turn and reason. `inference_turns` exposes the per-turn ids for reuse
(preference training scores the chosen and rejected replies the same way).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from tunesmith.data.conversation import Conversation
from tunesmith.data.turns import Refusal, TemplateMismatch, TurnRenderer, TurnText
from tunesmith.errors import UserError

IGNORE_INDEX = -100
BATCH = 4096  # conversations per tokenizer call: big enough for Rust's parallelism, small enough to overlap
MAX_LISTED = 20
__all__ = ["IGNORE_INDEX", "InferenceTurn", "Refusal", "TemplateMismatch", "TokenizeReport", "TokenizedSample",
           "TurnRenderer", "inference_turns", "tokenize_all", "tokenize_conversation"]


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


@dataclass(frozen=True)
class InferenceTurn:
    """One assistant turn in ids: what inference feeds the model, and what the model must write."""

    number: int  # 1-based position of the assistant turn in the conversation as written
    prompt_ids: list[int]  # = tokenize(apply_chat_template(messages[:i], add_generation_prompt=True))
    target_ids: list[int]  # the reply through the end-of-turn token, as the model generates it after prompt_ids


@dataclass
class TokenizeReport:
    """What tokenizing did: counts to print, and the samples it had to drop (never silently)."""

    samples: int = 0
    truncated: int = 0
    chunked_documents: int = 0
    split_conversations: int = 0  # conversations trained as several samples (the template rewrites history)
    split_samples: int = 0  # the samples those made
    folded_system: int = 0  # system prompts folded into the first user turn (the template has no system role)
    system_note: str = ""  # why the template needs the fold
    refused: list[Refusal] = field(default_factory=list)  # samples that cannot be trained as inference renders them
    dropped: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # token length of each sample before truncation
    tokens: int = 0
    trained_tokens: int = 0

    def notices(self) -> list[str]:
        """Lines for the training log and `data inspect`: what was done to fit the template."""
        lines = []
        if self.folded_system:
            lines.append(f"note: folded the system prompt into the first user turn in {self.folded_system} samples: "
                         f"the chat template has no system role (it {self.system_note}); --no-fold-system refuses "
                         "them instead")
        if self.split_conversations:
            lines.append(f"note: {self.split_conversations} conversations were split into {self.split_samples} "
                         "samples, so every assistant turn is trained in the context inference gives it (the "
                         "template renders earlier turns differently once later turns exist)")
        if self.refused:
            lines.append(f"warning: skipped {len(self.refused)} samples that cannot be trained as inference renders "
                         f"them (--skip-invalid); the first: {self.refused[0]}")
        return lines


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[Any]:
    """Encodings (.ids, .offsets) of many texts; no special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # Rust, parallel across texts
        return backend.encode_batch(texts, add_special_tokens=False)
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [SimpleNamespace(ids=i, offsets=o) for i, o in zip(out["input_ids"], out["offset_mapping"])]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """The exact text of `ids` (special tokens kept, no space clean-up)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _covering(encoding: Any, ids: list[int], length: int) -> list[int] | None:
    """The ids of the tokens that cover exactly the first `length` characters (None: a token crosses it)."""
    if length == 0 or not ids:
        return [] if length == 0 else None
    if not isinstance(encoding, SimpleNamespace):  # Rust: a lookup or two instead of a pass over all offsets
        if encoding.token_to_chars(len(ids) - 1)[1] <= length:
            return ids
        after = encoding.char_to_token(length)  # the first token that covers character `length`
        if after is not None:
            return ids[:after] if encoding.token_to_chars(after)[0] == length else None
    offsets = encoding.offsets  # some characters belong to no token (a normalizer dropped them): walk
    count = sum(1 for start, _ in offsets if start < length)
    return ids[:count] if all(end <= length for _, end in offsets[:count]) else None


def added_strings(tokenizer: Any) -> tuple[str, ...]:
    """The added tokens' strings: text is split at them before tokenizing, so none merges across one."""
    return tuple(str(t) for t in tokenizer.added_tokens_decoder.values())


def _layout(turns: list[TurnText], added: tuple[str, ...]) -> tuple[list[str], list[tuple[int, int]]]:
    """The texts to tokenize for a conversation's turns, and per turn (index of P, index of a text starting
    with P + target). Every prompt is tokenized; P + target on its own only where the next prompt does not
    start with it and end it at an added token (a text ending at one tokenizes the same whatever follows)."""
    texts = [turn.prompt for turn in turns]
    where: list[tuple[int, int]] = []
    for i, turn in enumerate(turns):
        full = turn.prompt + turn.target
        if i + 1 < len(turns) and turns[i + 1].prompt.startswith(full) and turn.target.endswith(added):
            where.append((i, i + 1))
        else:
            texts.append(full)
            where.append((i, len(texts) - 1))
    return texts, where


def _turn_ids(tokenizer: Any, source: str, turns: list[TurnText], where: list[tuple[int, int]],
              encodings: Any) -> list[InferenceTurn]:
    """P's ids, then the target's ids as the model generates them after P, for each turn.

    When no token crosses the prompt/target boundary, the target's ids are those of P + target
    after P's; when one does (a merge across it), the target is tokenized on its own: after P
    the model starts a fresh token. Refused if that does not decode to the same text.
    """
    ids = [list(e.ids) for e in encodings]
    out: list[InferenceTurn] = []
    for turn, (p, w) in zip(turns, where):
        p_ids, whole, whole_ids = ids[p], encodings[w], ids[w]
        s_ids = _covering(whole, whole_ids, len(turn.prompt) + len(turn.target))
        if s_ids is None:
            s_ids = list(tokenizer.encode(turn.prompt + turn.target, add_special_tokens=False))
        if s_ids[:len(p_ids)] == p_ids and _covering(whole, whole_ids, len(turn.prompt)) == p_ids:
            out.append(InferenceTurn(turn.number, p_ids, s_ids[len(p_ids):]))
            continue
        alone = list(tokenizer.encode(turn.target, add_special_tokens=False))
        if _decode(tokenizer, p_ids + alone) != _decode(tokenizer, s_ids):
            raise Refusal(f"{source}: turn {turn.number}: the tokenizer merges the end of the prompt with the start "
                          f"of the reply ({turn.target[:20]!r}), and the reply alone does not tokenize to the same "
                          "text", ["fix: remove the reply's leading whitespace"])
        out.append(InferenceTurn(turn.number, p_ids, alone))
    return out


def inference_turns(conv: Conversation, tokenizer: Any, *, fold_system: bool = True,
                    renderer: TurnRenderer | None = None) -> list[InferenceTurn]:
    """Every assistant turn of a chat `conv` as inference tokenizes it: (prompt_ids, target_ids).

    The one definition of "what the model is given and what it must write" for a turn; SFT
    labels and preference scoring (chosen vs rejected replies after the same prompt) both use
    it. `tokenizer` must carry the chat template (see `choose_template`). Raises `Refusal`
    (naming sample, turn, reason) when a turn cannot be trained as inference renders it. Pass one
    `renderer` (a `TurnRenderer` of this tokenizer) for many calls, to probe the template once.
    """
    turns = (renderer or TurnRenderer(tokenizer, fold_system)).turns(conv)
    texts, where = _layout(turns, added_strings(tokenizer))
    return _turn_ids(tokenizer, conv.source, turns, where, _encode_batch(tokenizer, texts))


def _conversation_samples(source: str, turns: list[InferenceTurn], train_on_prompt: bool) -> list[TokenizedSample]:
    """Consecutive turns share a sample while each one's prompt ids extend the sample exactly; else a new one."""
    samples: list[TokenizedSample] = []
    ids: list[int] = []
    labels: list[int] = []
    first = turns[0].number if turns else 0
    for turn in turns:
        if ids and turn.prompt_ids[:len(ids)] != ids:  # inference gives this turn another history
            samples.append(TokenizedSample(ids, labels, f"{source} (turn {first})"))
            ids, labels, first = [], [], turn.number
        context = turn.prompt_ids[len(ids):]
        ids += context + turn.target_ids
        labels += (context if train_on_prompt else [IGNORE_INDEX] * len(context)) + turn.target_ids
    if ids:
        samples.append(TokenizedSample(ids, labels, f"{source} (turn {first})" if samples else source))
    return samples


def tokenize_conversation(conv: Conversation, tokenizer: Any, max_length: int,
                          train_on_prompt: bool = False) -> TokenizedSample:
    """One conversation -> its first sample (text documents longer than max_length: the first chunk)."""
    samples, report = tokenize_all([conv], tokenizer, max_length, train_on_prompt, skip_invalid=True)
    if report.refused:
        raise report.refused[0]
    if not samples:
        raise UserError(f"{conv.source}: nothing left to train on after truncation to {max_length} tokens",
                        report.dropped)
    return samples[0]


Layout = tuple[list[TurnText], list[tuple[int, int]], int]  # turns, where their texts are, how many texts
Plan = list[tuple[Conversation, "Layout | None"]]


def tokenize_all(convs: list[Conversation], tokenizer: Any, max_length: int, train_on_prompt: bool = False, *,
                 fold_system: bool = True, skip_invalid: bool = False) -> tuple[list[TokenizedSample], TokenizeReport]:
    """Tokenize many conversations in batches; text documents are split into chunks.

    Chat samples longer than `max_length` are truncated (counted); a sample left with no
    trained token is dropped and listed in the report, never trained on silently. Samples that
    cannot be trained as inference renders them raise one `UserError` listing them (with
    `skip_invalid`: skipped, kept in `report.refused`). Rendering (Python) of batch k+1
    overlaps the Rust tokenizer's work on batch k.
    """
    if any(c.kind == "preference" for c in convs):
        raise UserError("preference data needs a preference objective: --objective dpo or orpo")
    report = TokenizeReport()
    turner = TurnRenderer(tokenizer, fold_system) if any(c.kind == "chat" for c in convs) else None
    samples: list[TokenizedSample] = []
    pending: tuple[Plan, Future[Any]] | None = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        for first in range(0, len(convs), BATCH):
            plan, texts = _plan_batch(convs[first:first + BATCH], turner, report)
            future = pool.submit(_encode_batch, tokenizer, texts)
            if pending is not None:
                _assemble(*pending, tokenizer, max_length, train_on_prompt, samples, report)
            pending = (plan, future)
        if pending is not None:
            _assemble(*pending, tokenizer, max_length, train_on_prompt, samples, report)
    report.samples = len(samples)
    if turner is not None:
        report.folded_system, report.system_note = turner.folded, turner.renderer.system_role or ""
    if report.refused and not skip_invalid:
        raise UserError(f"{len(report.refused)} samples cannot be trained the way inference renders them",
                        [str(r) for r in report.refused[:MAX_LISTED]] + [
                            "fix: the reasons above; or pass --skip-invalid to skip these samples "
                            "(tunesmith data inspect FILE shows what is trained)"])
    return samples, report


def _plan_batch(batch: list[Conversation], turner: TurnRenderer | None,
                report: TokenizeReport) -> tuple[Plan, list[str]]:
    """Render each conversation's turns (refusals recorded) and list the texts to tokenize."""
    plan: Plan = []
    texts: list[str] = []
    added = added_strings(turner.renderer.tokenizer) if turner is not None else ()
    for conv in batch:
        if conv.kind == "text":
            plan.append((conv, None))
            texts.append(conv.text or "")
            continue
        try:
            turns = turner.turns(conv)  # type: ignore[union-attr]
        except Refusal as refusal:
            report.refused.append(refusal)
            continue
        layout, where = _layout(turns, added)
        plan.append((conv, (turns, where, len(layout))))
        texts += layout
    return plan, texts


def _assemble(plan: Plan, future: Future[Any], tokenizer: Any, max_length: int, train_on_prompt: bool,
              samples: list[TokenizedSample], report: TokenizeReport) -> None:
    """Build each conversation's sample(s) from its encodings, and add them."""
    encodings = iter(future.result())
    for conv, layout in plan:
        if layout is None:
            samples += _document_chunks(next(encodings).ids, tokenizer, max_length, conv.source, report)
            continue
        turns, where, count = layout
        try:
            ids = _turn_ids(tokenizer, conv.source, turns, where, [next(encodings) for _ in range(count)])
        except Refusal as refusal:
            report.refused.append(refusal)
            continue
        made = _conversation_samples(conv.source, ids, train_on_prompt)
        if len(made) > 1:
            report.split_conversations += 1
            report.split_samples += len(made)
        for sample in made:
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
