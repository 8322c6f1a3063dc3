"""Text metrics on replies versus references: pure Python, no model, no dependencies.

ROUGE-L and chrF are implemented here rather than taken from `rouge-score` / `sacrebleu`:
each is ~20 lines, while the packages pull in nltk/absl (rouge-score) or portalocker,
lxml, tabulate and colorama (sacrebleu) for one function each. Both follow the reference
definitions (ROUGE-L: rouge-score's tokenizer and LCS F1 without stemming; chrF:
sacrebleu's corpus chrF, character 6-grams, beta 2, whitespace ignored); the tests pin
them to values computed by hand, and on 300 random sentence pairs they agreed with
rouge-score 0.1.2 and sacrebleu 2.6.0 to 1e-13.

Shares are in [0, 1]; chrF is on sacrebleu's 0-100 scale.
"""
from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

MAX_LABELS = 10
MAX_LABEL_WORDS = 3
CHRF_ORDER = 6
CHRF_BETA = 2.0


def normalize(text: str) -> str:
    """Lower case, punctuation deleted (SQuAD-style: "don't" -> "dont"), whitespace collapsed."""
    kept = "".join("" if unicodedata.category(ch).startswith("P") or ch in string.punctuation else ch
                   for ch in text.lower())
    return " ".join(kept.split())


def exact_match(replies: Sequence[str], references: Sequence[str]) -> float:
    """Share of replies equal to their reference after `normalize`."""
    pairs = list(zip(replies, references, strict=True))
    return sum(normalize(r) == normalize(ref) for r, ref in pairs) / len(pairs) if pairs else 0.0


def label_set(references: Sequence[str]) -> list[str] | None:
    """The labels when references come from a small set (e.g. positive/negative), else None.

    Small set: at most 10 distinct normalised references, each at most 3 words, every label
    seen twice on average (so free-text answers that happen to be short do not qualify).
    """
    labels = sorted({normalize(r) for r in references})
    if not labels or "" in labels or len(labels) > MAX_LABELS or len(references) < 2 * len(labels):
        return None
    if any(len(label.split()) > MAX_LABEL_WORDS for label in labels):
        return None
    return labels


def predicted_label(reply: str, labels: Sequence[str]) -> str | None:
    """The label a reply names first ("Sentiment: Positive!" -> "positive"); None if it names none."""
    words = f" {normalize(reply)} "
    found = [(words.find(f" {label} "), -len(label), label) for label in labels if f" {label} " in words]
    return min(found)[2] if found else None


def label_accuracy(replies: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> float:
    """Share of replies whose first named label is the reference's label."""
    pairs = list(zip(replies, references, strict=True))
    hits = sum(predicted_label(r, labels) == normalize(ref) for r, ref in pairs)
    return hits / len(pairs) if pairs else 0.0


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenization: lower case, runs of [a-z0-9] are the tokens."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one row of the DP table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(reply: str, reference: str) -> float:
    """ROUGE-L F1 of one reply: LCS over reply and reference tokens."""
    hyp, ref = rouge_tokens(reply), rouge_tokens(reference)
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(replies: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over samples."""
    scores = [rouge_l(r, ref) for r, ref in zip(replies, references, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0


def _char_ngrams(text: str, n: int) -> Counter[str]:
    """Character n-grams of `text` with whitespace removed (chrF ignores spaces)."""
    chars = "".join(text.split())
    return Counter(chars[i:i + n] for i in range(len(chars) - n + 1))


def chrf(replies: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0-100): n-gram statistics summed over samples, then the F-beta score.

    Precision and recall are averaged over the orders 1..6 that occur in both sides
    (sacrebleu's "effective order"), then combined with beta = 2 (recall weighs more).
    """
    hyp_n, ref_n, match_n = [0] * CHRF_ORDER, [0] * CHRF_ORDER, [0] * CHRF_ORDER
    for reply, reference in zip(replies, references, strict=True):
        for k in range(CHRF_ORDER):
            h, r = _char_ngrams(reply, k + 1), _char_ngrams(reference, k + 1)
            hyp_n[k] += sum(h.values()) if r else 0  # as sacrebleu: no reference n-grams, no penalty
            ref_n[k] += sum(r.values())
            match_n[k] += sum((h & r).values())
    orders = [k for k in range(CHRF_ORDER) if hyp_n[k] and ref_n[k]]
    if not orders:
        return 0.0
    precision = sum(match_n[k] / hyp_n[k] for k in orders) / len(orders)
    recall = sum(match_n[k] / ref_n[k] for k in orders) / len(orders)
    if precision + recall == 0:
        return 0.0
    beta2 = CHRF_BETA ** 2
    return 100 * (1 + beta2) * precision * recall / (beta2 * precision + recall)


def repetition_rate(replies: Sequence[str], n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same reply (pooled)."""
    total = repeated = 0
    for reply in replies:
        words = reply.lower().split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def uppercase_share(replies: Sequence[str]) -> float:
    """Share of letters (any script with case) that are upper case, pooled over replies."""
    letters = [ch for reply in replies for ch in reply if ch.isalpha() and ch.lower() != ch.upper()]
    return sum(ch.isupper() for ch in letters) / len(letters) if letters else 0.0


def perplexity(loss: float) -> float:
    """exp(mean token loss), capped so a diverged model prints as inf rather than overflowing."""
    return math.exp(loss) if loss < 700 else math.inf
