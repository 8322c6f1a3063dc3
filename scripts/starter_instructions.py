"""Instruction data for the starter model, generated from WordNet and from arithmetic.

Each task is a small function `(rng, synsets) -> (prompt, answer) | None`; `generate` draws
tasks by weight until it has `n` conversations. Nothing here is copied from a published
instruction data set: the prompts are phrase templates written for this project, the
answers come from WordNet fields or are computed.
"""
from __future__ import annotations

import random
from typing import Callable

from starter_corpus import Synset, synset_sentences

Pair = tuple[str, str]

SYSTEMS = ("You are a helpful assistant.", "You are a small, friendly assistant.",
           "Answer briefly.", "You are a helpful assistant. Keep answers short.")

SMALL_TALK: list[Pair] = [
    ("Hello!", "Hello! Ask me what a word means, a small sum, or how to rewrite a sentence."),
    ("Hi", "Hi there! What would you like to know?"),
    ("Good morning.", "Good morning! How can I help you today?"),
    ("Who are you?", "I am a small language model. I know the meanings of many English words and can do simple sums."),
    ("What can you do?", "I can define words, give synonyms and opposites, do simple arithmetic and rewrite sentences."),
    ("Thank you!", "You are welcome!"),
    ("Thanks for your help.", "Glad I could help."),
    ("How are you?", "I am fine, thank you. How can I help?"),
    ("Goodbye.", "Goodbye! Have a nice day."),
    ("Tell me something.", "Here is a fact: a river is a large natural stream of water."),
]

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen seventeen eighteen nineteen twenty").split()


def _pick(rng: random.Random, synsets: list[Synset], pos: str | None = None) -> Synset:
    """A random synset whose headword is a plain lowercase word (optionally of one part of speech)."""
    while True:
        s = rng.choice(synsets)
        w = s.words[0]
        if (pos is None or s.pos == pos) and w.isalpha() and w.islower() and len(w) > 2:
            return s


def task_define(rng: random.Random, synsets: list[Synset]) -> Pair | None:
    s = _pick(rng, synsets)
    w = s.words[0]
    prompt = rng.choice([f'What does the word "{w}" mean?', f"Define {w}.", f"What is the meaning of {w}?",
                         f"Explain the word {w}.", f"What does {w} mean?", f"Give a short definition of {w}."])
    return prompt, synset_sentences(s)[0]


def task_example(rng: random.Random, synsets: list[Synset]) -> Pair | None:
    s = _pick(rng, synsets)
    w = s.words[0]
    good = [e for e in s.examples if w in e.lower().split() and len(e) > 15]
    if not good:
        return None
    prompt = rng.choice([f"Use the word {w} in a sentence.", f'Write a sentence with the word "{w}".',
                         f"Give an example sentence for {w}."])
    e = rng.choice(good)
    return prompt, e[0].upper() + e[1:] + ("" if e[-1] in ".!?" else ".")


def task_synonym(rng: random.Random, synsets: list[Synset]) -> Pair | None:
    s = _pick(rng, synsets)
    others = [o for o in s.words[1:] if o.lower() != s.words[0]]
    if not others:
        return None
    w, o = s.words[0], rng.choice(others)
    prompt = rng.choice([f"Give me a synonym for {w}.", f"What is another word for {w}?",
                         f"Name a word that means the same as {w}."])
    return prompt, rng.choice([f"A synonym for {w} is {o}.", f"Another word for {w} is {o}.", f"{o.capitalize()}."])


def task_antonym(rng: random.Random, synsets: list[Synset]) -> Pair | None:
    s = _pick(rng, synsets)
    if not s.antonyms:
        return None
    w, a = s.words[0], s.antonyms[0]
    prompt = rng.choice([f"What is the opposite of {w}?", f"Give an antonym of {w}.",
                         f'What word means the opposite of "{w}"?'])
    return prompt, rng.choice([f"The opposite of {w} is {a}.", f"An antonym of {w} is {a}.", f"{a.capitalize()}."])


def task_kind_of(rng: random.Random, synsets: list[Synset]) -> Pair | None:
    s = _pick(rng, synsets, "n")
    if not s.hypernyms:
        return None
    w, h = s.words[0], s.hypernyms[0]
    art = "an" if w[0] in "aeiou" else "a"
    hart = "an" if h[0] in "aeiou" else "a"
    prompt = rng.choice([f"What kind of thing is {art} {w}?", f"{art.capitalize()} {w} is a type of what?",
                         f"What category does the word {w} belong to?"])
    return prompt, f"{art.capitalize()} {w} is a kind of {h}." if rng.random() < 0.8 else f"{hart.capitalize()} {h}."


def task_part_of_speech(rng: random.Random, synsets: list[Synset]) -> Pair | None:
    s = _pick(rng, synsets)
    name = {"n": "a noun", "v": "a verb", "a": "an adjective", "r": "an adverb"}[s.pos]
    w = s.words[0]
    prompt = rng.choice([f"Is {w} a noun, a verb, an adjective or an adverb?", f"What part of speech is {w}?"])
    return prompt, f"In this sense, {w} is {name}."


def task_arithmetic(rng: random.Random, synsets: list[Synset]) -> Pair | None:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    op = rng.choice(["plus", "minus", "times"])
    if op == "minus" and b > a:
        a, b = b, a
    if op == "times":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
    result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    sym = {"plus": "+", "minus": "-", "times": "*"}[op]
    prompt = rng.choice([f"What is {a} {op} {b}?", f"Calculate {a} {sym} {b}.", f"What is {a} {sym} {b}?",
                         f"Please add {a} and {b}." if op == "plus" else f"How much is {a} {op} {b}?"])
    if prompt.startswith("Please add"):
        return prompt, f"{a} plus {b} is {a + b}."
    return prompt, rng.choice([f"{a} {op} {b} is {result}.", f"{a} {sym} {b} = {result}.", f"The answer is {result}."])


def task_count_words(rng: random.Random, synsets: list[Synset]) -> Pair | None:
    n = rng.randint(1, 8)
    words = [_pick(rng, synsets).words[0] for _ in range(n)]
    prompt = f"How many words are in this list: {', '.join(words)}?"
    return prompt, f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} word{'s' * (n != 1)} in the list."


def _sentence(rng: random.Random, synsets: list[Synset]) -> str | None:
    s = rng.choice(synsets)
    good = [e for e in s.examples if 20 < len(e) < 90]
    if not good:
        return None
    e = rng.choice(good)
    return e[0].upper() + e[1:] + ("" if e[-1] in ".!?" else ".")


def task_casing(rng: random.Random, synsets: list[Synset]) -> Pair | None:
    text = _sentence(rng, synsets)
    if text is None:
        return None
    kind = rng.choice(["upper", "lower", "title"])
    prompt = {"upper": rng.choice(["Rewrite this sentence in upper case:", "Convert to uppercase:"]),
              "lower": rng.choice(["Rewrite this sentence in lower case:", "Convert to lowercase:"]),
              "title": rng.choice(["Capitalize every word:", "Rewrite in title case:"])}[kind]
    answer = {"upper": text.upper(), "lower": text.lower(), "title": text.title()}[kind]
    return f"{prompt} {text}", answer


def task_sort(rng: random.Random, synsets: list[Synset]) -> Pair | None:
    words = sorted({_pick(rng, synsets).words[0] for _ in range(rng.randint(3, 5))})
    shuffled = words[:]
    rng.shuffle(shuffled)
    return f"Sort these words alphabetically: {', '.join(shuffled)}.", ", ".join(words) + "."


def task_small_talk(rng: random.Random, synsets: list[Synset]) -> Pair | None:
    return rng.choice(SMALL_TALK)


TASKS: list[tuple[Callable[[random.Random, list[Synset]], Pair | None], float]] = [
    (task_define, 0.30), (task_example, 0.12), (task_synonym, 0.10), (task_antonym, 0.05),
    (task_kind_of, 0.08), (task_part_of_speech, 0.05), (task_arithmetic, 0.12), (task_count_words, 0.03),
    (task_casing, 0.08), (task_sort, 0.04), (task_small_talk, 0.03),
]


def generate(synsets: list[Synset], n: int, seed: int) -> list[list[dict[str, str]]]:
    """`n` conversations (lists of {role, content}); a few have a system turn or two exchanges."""
    rng = random.Random(seed)
    funcs, weights = zip(*TASKS)
    out: list[list[dict[str, str]]] = []
    while len(out) < n:
        turns: list[dict[str, str]] = []
        if rng.random() < 0.25:
            turns.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for _ in range(2 if rng.random() < 0.15 else 1):
            pair = None
            while pair is None:
                pair = rng.choices(funcs, weights)[0](rng, synsets)
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        out.append(turns)
    return out
