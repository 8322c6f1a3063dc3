"""Write the bundled example datasets (src/tunesmith/assets/examples/), seeded and reproducible.

    python3 scripts/make_examples.py

The pieces (topics, frames, word tables) are hand-written for tunesmith in
scripts/examples_pieces.py; this script combines them. `corpus.txt` is a selection from
Ambrose Bierce's "The Devil's Dictionary" (1911, public domain), taken from the Debian
package dict-devil (downloaded with apt-get when not already unpacked in .starter_build/).
"""
from __future__ import annotations

import csv
import gzip
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import examples_pieces as P  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "tunesmith" / "assets" / "examples"
CAPS_SYSTEM = "Write a tweet in all capital letters."
SEED = 20261124


def caps_topics() -> list[str]:
    """Every distinct topic: things, plus places and events in a few frames (about 300)."""
    topics = list(P.TOPIC_THINGS)
    for pattern in P.TOPIC_PATTERNS:
        items = P.TOPIC_PLACES if "{place}" in pattern else P.TOPIC_EVENTS
        topics += [pattern.format(place=x, event=x) for x in items]
    return list(dict.fromkeys(topics))


def caps_tweet(rng: random.Random, topic: str) -> str:
    """One all-caps tweet about `topic`: opener + body + closer (+ sometimes a hashtag)."""
    body = rng.choice(P.TWEET_BODIES).replace("{T}", topic.upper())
    text = f"{rng.choice(P.TWEET_OPENERS)} {body}{rng.choice(P.TWEET_CLOSERS)}" if rng.random() < 0.6 \
        else f"{body}{rng.choice(P.TWEET_CLOSERS)}"
    if rng.random() < 0.4:
        text += " #" + re.sub(r"[^A-Z0-9]", "", topic.upper().split()[-1])
    return text


def caps_tweets(rng: random.Random) -> list[dict]:
    """ShareGPT rows: system + "The topic is: X" -> an all-caps tweet, one row per topic."""
    rows = []
    for topic in caps_topics()[:300]:
        rows.append({"conversations": [
            {"from": "system", "value": CAPS_SYSTEM},
            {"from": "human", "value": f"The topic is: {topic}"},
            {"from": "gpt", "value": caps_tweet(rng, topic)},
        ]})
    rng.shuffle(rows)
    return rows


def sarcastic_qa(rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs: how-to and should-I questions in several frames, plus one-offs."""
    pairs = list(P.PLAIN_QA)
    for q, a in P.HOW_TO:
        for frame in P.HOW_FRAMES:
            ans = rng.choice(P.HOW_ANSWERS)
            pairs.append((frame.format(q=q), ans.format(a=a, A=a[0].upper() + a[1:])))
    for q, a in P.SHOULD:
        for frame in P.SHOULD_FRAMES:
            pairs.append((frame.format(q=q), a))
    rng.shuffle(pairs)
    return pairs[:200]


def _alpaca(instruction: str, inp: str, output: str) -> dict:
    return {"instruction": instruction, "input": inp, "output": output}


def instructions(rng: random.Random) -> list[dict]:
    """Alpaca rows over small tasks: verbs, sentiment, translation, formal rewriting, plurals, ..."""
    rows = []
    for subj in P.SUBJECTS:
        for verb, obj in rng.sample(P.VERBS, 3):
            rows.append(_alpaca(rng.choice(["Find the verb in this sentence.", "Which word is the verb?"]),
                                f"{subj} {verb} {obj}.", verb))
    for label, sentences in P.SENTIMENT.items():
        rows += [_alpaca("Classify the sentiment of the text as positive or negative.", s, label) for s in sentences]
    langs = ("French", "Spanish", "German")
    for en, *words in P.TRANSLATE:
        for lang, word in rng.sample(list(zip(langs, words)), 2):
            rows.append(_alpaca(f"Translate the word into {lang}.", en, word))
    rows += [_alpaca("Rewrite the sentence in a formal tone.", a, b) for a, b in P.INFORMAL]
    rows += [_alpaca("Give the plural of the noun.", a, b) for a, b in P.PLURALS]
    rows += [_alpaca(f"What is the capital of {c}?", "", f"The capital of {c} is {k}.") for c, k in P.CAPITALS]
    rows += [_alpaca("Give the opposite of the word.", a, b) for a, b in P.OPPOSITES]
    for _ in range(25):
        nums = rng.sample(range(1, 100), rng.randint(4, 7))
        rows.append(_alpaca("Sort the numbers from smallest to largest.", ", ".join(map(str, nums)),
                            ", ".join(map(str, sorted(nums)))))
    for _ in range(20):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        item = rng.choice(["apples", "stamps", "marbles", "books", "pencils"])
        rows.append(_alpaca("Solve the word problem.", f"Sam has {a} {item} and buys {b} more. How many {item} "
                            f"does Sam have now?", f"Sam has {a + b} {item}."))
    rng.shuffle(rows)
    return rows[:200]


def chats(rng: random.Random) -> list[dict]:
    """Multi-turn `messages` rows (2-3 user turns), each a small themed exchange."""
    rows = []
    for _ in range(100):
        kind = rng.choice(["plural", "translate", "capital", "math"])
        msgs = [{"role": "system", "content": "You are a concise, friendly assistant."}] if rng.random() < 0.3 else []
        if kind == "plural":
            picks = rng.sample(P.PLURALS, 3)
            msgs += [{"role": "user", "content": f"What is the plural of {picks[0][0]}?"},
                     {"role": "assistant", "content": f"The plural of {picks[0][0]} is {picks[0][1]}."}]
            for s, p in picks[1:]:
                msgs += [{"role": "user", "content": f"And {s}?"}, {"role": "assistant", "content": f"{p.capitalize()}."}]
        elif kind == "translate":
            en, fr, es, de = rng.choice(P.TRANSLATE)
            msgs += [{"role": "user", "content": f"How do you say {en} in French?"},
                     {"role": "assistant", "content": f"In French, {en} is \"{fr}\"."},
                     {"role": "user", "content": "What about Spanish?"},
                     {"role": "assistant", "content": f"In Spanish it is \"{es}\"."}]
        elif kind == "capital":
            (c1, k1), (c2, k2) = rng.sample(P.CAPITALS, 2)
            msgs += [{"role": "user", "content": f"What's the capital of {c1}?"},
                     {"role": "assistant", "content": f"{k1}."},
                     {"role": "user", "content": f"Thanks! And the capital of {c2}?"},
                     {"role": "assistant", "content": f"The capital of {c2} is {k2}."}]
        else:
            a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
            msgs += [{"role": "user", "content": f"What is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                     {"role": "user", "content": f"Now multiply that by {c}."},
                     {"role": "assistant", "content": f"{a + b} times {c} is {(a + b) * c}."}]
        rows.append({"messages": msgs})
    return rows


def preferences(rng: random.Random) -> list[dict]:
    """prompt/chosen/rejected rows: a correct, polite answer against a wrong or rude one."""
    rows = []
    for c, k in P.CAPITALS:
        wrong = rng.choice([x for _, x in P.CAPITALS if x != k])
        rows.append({"prompt": f"What is the capital of {c}?", "chosen": f"The capital of {c} is {k}.",
                     "rejected": f"The capital of {c} is {wrong}."})
    for a, b in P.OPPOSITES:
        rows.append({"prompt": f"What is the opposite of {a}?", "chosen": f"The opposite of {a} is {b}.",
                     "rejected": rng.choice(["Look it up yourself.", f"The opposite of {a} is {a}.", "Why do you care?"])})
    for s, p in P.PLURALS:
        rows.append({"prompt": f"What is the plural of {s}?", "chosen": f"The plural of {s} is {p}.",
                     "rejected": f"The plural of {s} is {s}s, obviously."})
    for inf, formal in P.INFORMAL:
        rows.append({"prompt": f"Make this sentence more formal: {inf}", "chosen": formal,
                     "rejected": inf.upper()})
    while len(rows) < 100:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.",
                     "rejected": f"{a} + {b} = {a + b + rng.choice([-3, -1, 1, 2, 10])}."})
    rng.shuffle(rows)
    return rows[:100]


def devil_excerpt(max_chars: int = 60_000) -> str:
    """The first entries of The Devil's Dictionary (public domain), from the dict-devil package."""
    unpacked = ROOT / ".starter_build" / "debs" / "root" / "usr/share/dictd/devil.dict.dz"
    with tempfile.TemporaryDirectory() as tmp:
        if not unpacked.is_file():
            subprocess.run(["apt-get", "download", "dict-devil"], cwd=tmp, check=True)
            deb = next(Path(tmp).glob("dict-devil_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), tmp], check=True)
            unpacked = Path(tmp) / "usr/share/dictd/devil.dict.dz"
        raw = gzip.open(unpacked, "rt", encoding="latin-1").read()
    body = raw[raw.index("ABASEMENT"):]
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body) if p.strip()]
    out, size = [], 0
    for p in paras:
        if size + len(p) > max_chars:
            break
        out.append(p)
        size += len(p) + 2
    header = "The Devil's Dictionary, by Ambrose Bierce (1911). A public domain text.\n\n"
    return header + "\n\n".join(out) + "\n"


def main() -> None:
    """Write all six datasets."""
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    with open(OUT / "caps_tweets.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in caps_tweets(rng))
    with open(OUT / "sarcastic_qa.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        w.writerows(sarcastic_qa(rng))
    (OUT / "instructions.json").write_text(json.dumps(instructions(rng), indent=1, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    for name, rows in (("chat.jsonl", chats(rng)), ("preferences.jsonl", preferences(rng))):
        with open(OUT / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (OUT / "corpus.txt").write_text(devil_excerpt(), encoding="utf-8")
    for p in sorted(OUT.iterdir()):
        print(f"{p.name}: {p.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
