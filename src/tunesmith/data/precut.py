"""Cut samples that cannot fit in --max-length before tokenizing them, so a 20 MB row takes a second.

No token stands for more characters than the longest string in the vocabulary, so a
conversation with more than `2 * (max_length + 1) * longest` characters of content has
more than twice max_length tokens whatever the tokenizer does: truncation will keep only
its start. Tokenizing all of it (minutes and gigabytes for 20 MB) would change nothing,
so its content is cut to that many characters first; the turns after the cut keep one
character each, so the conversation keeps its shape (and its mask) for the tokens that
survive truncation. The cut samples are counted and reported. Raw text documents are not
cut: they are split into chunks, so every token of them is used.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from tunesmith.data.conversation import Conversation, Turn


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for: the length of its longest vocabulary string.

    Byte-level vocabularies spell one byte per character, which is at least as many as the
    characters it decodes to; "▁"-style vocabularies spell a space as one character.
    """
    return max((len(token) for token in tokenizer.get_vocab()), default=1) or 1


def char_budget(tokenizer: Any, max_length: int) -> int:
    """Content characters beyond which a sample surely exceeds twice `max_length` tokens."""
    return 2 * (max_length + 1) * longest_token_chars(tokenizer)


def _cut_turns(turns: list[Turn], budget: int) -> tuple[list[Turn], int]:
    """The turns with content cut to `budget` characters in all; returns what budget is left."""
    out = []
    for turn in turns:
        if len(turn.content) <= budget:
            out.append(turn)
            budget -= len(turn.content)
        elif budget > 0:
            out.append(Turn(turn.role, turn.content[:budget]))
            budget = 0
        else:
            out.append(Turn(turn.role, turn.content.strip()[:1] or turn.content[:1]))
    return out, budget


def cut_overlong(convs: list[Conversation], tokenizer: Any, max_length: int) -> tuple[list[Conversation], int]:
    """The conversations with the ones over the character budget cut (see the module doc); and how many."""
    budget = char_budget(tokenizer, max_length)
    out, cut = [], 0
    for conv in convs:
        turns = conv.turns + (conv.chosen or []) + (conv.rejected or [])
        if conv.kind == "text" or sum(len(t.content) for t in turns) <= budget:
            out.append(conv)
            continue
        cut += 1
        if conv.kind == "preference":
            prompt, left = _cut_turns(conv.turns, budget)
            chosen, _ = _cut_turns(conv.chosen or [], left)  # each reply is rendered after the prompt on its own
            rejected, _ = _cut_turns(conv.rejected or [], left)
            out.append(replace(conv, turns=prompt, chosen=chosen, rejected=rejected))
        else:
            out.append(replace(conv, turns=_cut_turns(conv.turns, budget)[0]))
    return out, cut
