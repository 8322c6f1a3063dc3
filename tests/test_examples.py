"""The bundled example datasets: each reads with zero invalid rows, in the format it shows off."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.data.readers import read_conversations

EXAMPLES = Path(__file__).resolve().parent.parent / "src" / "tunesmith" / "assets" / "examples"

# file -> (format the reader should detect, smallest number of rows, kind of sample)
EXPECTED = {
    "caps_tweets.jsonl": ("sharegpt", 300, "chat"),
    "sarcastic_qa.csv": ("qa", 200, "chat"),
    "instructions.json": ("alpaca", 200, "chat"),
    "chat.jsonl": ("messages", 100, "chat"),
    "preferences.jsonl": ("preference", 100, "preference"),
    "corpus.txt": ("text", 1, "text"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_reads_cleanly(name: str) -> None:
    fmt, least, kind = EXPECTED[name]
    conversations, report = read_conversations(str(EXAMPLES / name))
    assert report.rows_invalid == 0, report.problems
    assert report.format == fmt
    assert len(conversations) >= least
    assert {c.kind for c in conversations} == {kind}


def test_caps_tweets_are_all_caps_with_distinct_topics() -> None:
    rows = [json.loads(line) for line in (EXAMPLES / "caps_tweets.jsonl").read_text(encoding="utf-8").splitlines()]
    topics = [r["conversations"][1]["value"] for r in rows]
    assert len(set(topics)) == len(topics), "every row should have its own topic (held-out topics stay unseen)"
    for r in rows:
        system, human, gpt = r["conversations"]
        assert system == {"from": "system", "value": "Write a tweet in all capital letters."}
        assert human["value"].startswith("The topic is: ")
        assert gpt["value"] == gpt["value"].upper() and any(c.isalpha() for c in gpt["value"])


def test_example_rows_are_not_duplicated() -> None:
    for name in ("instructions.json", "chat.jsonl", "preferences.jsonl"):
        text = (EXAMPLES / name).read_text(encoding="utf-8")
        rows = json.loads(text) if name.endswith(".json") else [json.loads(x) for x in text.splitlines()]
        keys = [json.dumps(r, sort_keys=True) for r in rows]
        assert len(set(keys)) >= 0.9 * len(keys), name


def test_caps_tweets_match_their_generator() -> None:
    """The committed file is what scripts/make_examples.py writes (no hand edits drift in)."""
    import random
    import sys

    sys.path.insert(0, str(EXAMPLES.parents[3] / "scripts"))
    import make_examples

    rows = make_examples.caps_tweets(random.Random(make_examples.SEED))
    lines = (EXAMPLES / "caps_tweets.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == rows
