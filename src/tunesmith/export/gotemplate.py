"""Ollama's TEMPLATE (Go text/template) for a model's jinja chat template, derived by probing.

Translating arbitrary jinja into Go templates is a compiler project; instead we *observe*
the jinja template. Rendering probe conversations whose contents are unique markers shows
the literal text each role is wrapped in (what comes before and after a user turn, an
assistant turn, the system prompt, and the generation prompt). Those pieces are emitted
as a Go template of a fixed, small shape, then checked: the Go template must render the
probe conversations to exactly the jinja text, or the export stops and says so (a
template whose output depends on more than role and position, e.g. dates or tool lists,
cannot be carried over this way).

Two system-prompt layouts are recognised: a block before the first turn (Llama 3, ChatML,
zephyr, ...), and text folded into the first user turn (Gemma). Leading BOS text is left
out when the runtime adds BOS itself (llama.cpp's `add_bos_token`), as Ollama's own
templates do, so the prompt does not start with two BOS tokens.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from tunesmith.errors import UserError

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> text
SYS, U1, A1, U2, A2 = "SYSPROBE7", "USERPROBE1", "ASSTPROBE1", "USERPROBE2", "ASSTPROBE2"


@dataclass
class TurnPieces:
    """The literal text around each part of a conversation, as the jinja template writes it."""

    head: str  # before the first user turn when there is no system prompt
    user_pre: str
    user_suf: str
    asst_pre: str
    asst_suf: str
    generation: str  # after the last user turn, asking for the reply (minus user_suf)
    sys_pre: str | None = None  # "block" layout: sys_pre + SYSTEM + sys_suf replaces head
    sys_suf: str | None = None
    sys_sep: str | None = None  # "first-user" layout: SYSTEM + sys_sep starts the first user content

    @property
    def has_system(self) -> bool:
        """Whether the template has a place for a system prompt that Ollama's template can fill."""
        return self.sys_pre is not None or self.sys_sep is not None


def _msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


class NotDerivable(UserError):
    """The jinja template does not fit the shape we can express in Go."""


def _cut(text: str, *markers: str) -> list[str]:
    """The text between consecutive markers (len(markers) + 1 pieces); each marker exactly once."""
    pieces, rest = [], text
    for mark in markers:
        if rest.count(mark) != 1:
            raise NotDerivable(f"the chat template does not write message content verbatim ({mark} "
                               f"appears {rest.count(mark)} times)")
        before, rest = rest.split(mark)
        pieces.append(before)
    return [*pieces, rest]


def _render(render: Render, messages: list[dict[str, str]], gen: bool) -> str:
    try:
        return render(messages, gen)
    except Exception as exc:  # the probe broke a template rule (raise_exception in jinja)
        raise NotDerivable(f"the chat template refused a probe conversation: {exc}") from None


def turn_pieces(render: Render) -> TurnPieces:
    """Observe the jinja template through `render` and return the text around each part."""
    two = _msgs(("user", U1), ("assistant", A1), ("user", U2), ("assistant", A2))
    head, x1, y, x2, tail = _cut(_render(render, two, False), U1, A1, U2, A2)
    # After an assistant turn comes either the next user turn (y) or the end of the text (tail,
    # which may add a final EOS, as Phi-3's does): the assistant suffix is a prefix of both, and
    # the rest of y, the user prefix, also ends the head. Usually the tail is exactly the
    # suffix; otherwise the shortest prefix that leaves a user prefix ending the head.
    shared = len(os.path.commonprefix([y, tail]))
    cut = next((k for k in (len(tail), *range(shared + 1)) if k <= shared and head.endswith(y[k:])), None)
    if x1 != x2 or cut is None:
        raise NotDerivable("the chat template writes turns differently depending on their position")
    asst_suf, user_pre = y[:cut], y[cut:]
    head = head[:len(head) - len(user_pre)]
    prompt = _render(render, two[:3], True)
    lead = head + user_pre + U1 + x1 + A1 + y + U2
    if not prompt.startswith(lead):
        raise NotDerivable("adding the generation prompt changes earlier turns")
    generation = prompt[len(lead):]
    only_user = _render(render, two[:1], False)
    user_suf = only_user[len(head + user_pre + U1):] if only_user.startswith(head + user_pre + U1) else ""
    if not (x1.startswith(user_suf) and generation.startswith(user_suf)):
        user_suf = ""
    pieces = TurnPieces(head, user_pre, user_suf, x1[len(user_suf):], asst_suf, generation[len(user_suf):])
    _system_layout(render, pieces, two)
    return pieces


def _system_layout(render: Render, p: TurnPieces, two: list[dict[str, str]]) -> None:
    """Find where the system prompt goes: its own block, or the start of the first user turn.

    Leaves both layouts unset when neither fits (or the template refuses system messages,
    as Gemma 2's does): the Ollama template then has no system prompt, and export refuses
    a run that trained with one.
    """
    plain = _render(render, two, False)
    try:
        with_sys = _render(render, _msgs(("system", SYS)) + two, False)
    except NotDerivable:
        return
    rest = plain[len(p.head):]
    if with_sys.endswith(rest) and with_sys[:len(with_sys) - len(rest)].count(SYS) == 1:
        p.sys_pre, p.sys_suf = with_sys[:len(with_sys) - len(rest)].split(SYS)
        return
    first = p.head + p.user_pre
    middle = with_sys[len(first):len(with_sys) - len(plain) + len(first)]
    if with_sys.startswith(first) and with_sys.endswith(plain[len(first):]) and middle.startswith(SYS):
        p.sys_sep = middle[len(SYS):]


def _literal(text: str) -> str:
    """Text as Go template literal text (it must not contain action delimiters)."""
    if "{{" in text or "}}" in text or '"""' in text:
        raise NotDerivable("the chat template's literal text contains '{{', '}}' or '\"\"\"'")
    return text


def go_template(p: TurnPieces, bos: str | None = None) -> str:
    """The Go template of the pieces; `bos`: leading BOS text to leave to the runtime's tokenizer."""
    def unbos(text: str) -> str:
        return text[len(bos):] if bos and text.startswith(bos) else text

    L = _literal
    if p.sys_pre is not None:
        top = (f"{{{{ if .System }}}}{L(unbos(p.sys_pre))}{{{{ .System }}}}{L(p.sys_suf or '')}"
               f"{{{{ else }}}}{L(unbos(p.head))}{{{{ end }}}}")
        sys_in_user = ""
    else:
        top = L(unbos(p.head))
        sys_in_user = ("" if p.sys_sep is None else
                       f"{{{{ if and $first $.System }}}}{{{{ $.System }}}}{L(p.sys_sep)}{{{{ end }}}}")
    first_decl, first_done = ("{{ $first := true }}", "{{ $first = false }}") if sys_in_user else ("", "")
    return (
        f"{first_decl}{top}"
        "{{ range $i, $_ := .Messages }}"
        "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f"{{{{ if eq .Role \"user\" }}}}{L(p.user_pre)}{sys_in_user}{{{{ .Content }}}}{L(p.user_suf)}"
        f"{{{{ if $last }}}}{L(p.generation)}{{{{ end }}}}{first_done}"
        f"{{{{ else if eq .Role \"assistant\" }}}}{L(p.asst_pre)}{{{{ .Content }}}}{L(p.asst_suf)}"
        "{{ end }}{{ end }}"
    )


def check_go_template(template: str, render: Render, go_render: Callable[[str, str, list], str],
                      bos: str | None) -> None:
    """Refuse a Go template that does not render the probes exactly as jinja (minus runtime BOS)."""
    cases = [_msgs(("user", U1)), _msgs(("user", U1), ("assistant", A1), ("user", U2))]
    if "System" in template:
        cases.append(_msgs(("system", SYS), ("user", U1), ("assistant", A1), ("user", U2)))
    for messages in cases:
        want = _render(render, messages, True)
        if bos and want.startswith(bos):
            want = want[len(bos):]
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        if go_render(template, system, messages) != want:
            raise NotDerivable("the derived Ollama template does not reproduce the chat template's text")
