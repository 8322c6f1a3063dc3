"""A small evaluator of the Go text/template subset that `export.gotemplate` emits.

Ollama renders TEMPLATE with Go's text/template; Python has none. Export checks every
derived template by rendering it here and comparing with the jinja text, so this covers
exactly what we emit and refuses anything else loudly: text with `{{-`/`-}}` trimming,
`if / else if / else / end`, `range $i, $_ := PIPE`, `$x := PIPE`, `$x = PIPE`, fields
(`.Role`, `$.System`), string and integer literals, parentheses, and the functions
`eq`, `and`, `not`, `len`, `slice`. Semantics follow text/template's documentation
(truthiness: empty string, zero, empty list and nil are false; `and` returns its first
false argument or its last).
"""
from __future__ import annotations

import re
import shlex
from typing import Any

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


class GoTemplateError(ValueError):
    """A construct outside the supported subset, or a malformed template."""


def _nodes(source: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with the trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in ACTION.finditer(source):
        text = source[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = source[pos:]
    out.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return out


def _parse(nodes: list[tuple[str, str]], i: int, stops: tuple[str, ...]) -> tuple[list[Any], int, str]:
    """A block of nodes up to one of `stops` ("end", "else"...); returns (block, next index, stop)."""
    block: list[Any] = []
    while i < len(nodes):
        kind, body = nodes[i]
        i += 1
        if kind == "text":
            block.append(("text", body))
        elif body == "end" or body == "else" or body.startswith("else if "):
            if body.split(" ")[0] not in {s.split(" ")[0] for s in stops}:
                raise GoTemplateError(f"unexpected {{{{ {body} }}}}")
            return block, i, body
        elif body.startswith("if "):
            branches, i = _parse_if(nodes, i, body[3:])
            block.append(("if", branches))
        elif body.startswith("range "):
            head = body[6:]
            names, _, pipe = head.rpartition(":=") if ":=" in head else ("", "", head)
            inner, i, stop = _parse(nodes, i, ("end",))
            block.append(("range", [n.strip() for n in names.split(",") if n.strip()], pipe.strip(), inner))
        else:
            block.append(("action", body))
    if stops:
        raise GoTemplateError(f"missing {{{{ end }}}} (expected one of {stops})")
    return block, i, ""


def _parse_if(nodes: list[tuple[str, str]], i: int, cond: str) -> tuple[list[tuple[str | None, list[Any]]], int]:
    branches: list[tuple[str | None, list[Any]]] = []
    while True:
        body, i, stop = _parse(nodes, i, ("end", "else", "else if"))
        branches.append((cond, body))
        if stop == "end":
            return branches, i
        cond = stop[8:] if stop.startswith("else if ") else None


def _truth(v: Any) -> bool:
    return v not in (None, False, 0, "") and not (isinstance(v, (list, dict)) and not v)


def _tokens(expr: str) -> list[str]:
    """Split a pipeline into operands, keeping parenthesised groups and quoted strings whole."""
    out, depth, cur, quote = [], 0, "", False
    for ch in expr:
        if ch == '"' and depth == 0:
            quote = not quote
        if ch == "(" and not quote:
            depth += 1
        if ch == ")" and not quote:
            depth -= 1
        if ch.isspace() and depth == 0 and not quote:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + ([cur] if cur else [])


FUNCS = {"eq": lambda a, *b: any(a == x for x in b), "not": lambda a: not _truth(a), "len": len,
         "slice": lambda a, *ix: a[ix[0]:ix[1]] if len(ix) > 1 else a[ix[0]:] if ix else a}


def _value(tok: str, dot: Any, scope: dict[str, Any]) -> Any:
    if tok.startswith("(") and tok.endswith(")"):
        return _eval(tok[1:-1], dot, scope)
    if tok.startswith('"'):
        return shlex.split(tok)[0] if tok != '""' else ""
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if tok in ("true", "false"):
        return tok == "true"
    base, _, path = tok.partition(".") if tok.startswith("$") else ("", "", tok[1:])
    if tok.startswith("$"):
        if base not in scope:
            raise GoTemplateError(f"undefined variable {base}")
        value = scope[base]
    elif tok.startswith("."):
        value = dot
    else:
        raise GoTemplateError(f"unsupported operand {tok!r}")
    for field in filter(None, path.split(".")):
        value = value.get(field) if isinstance(value, dict) else None
    return value


def _eval(expr: str, dot: Any, scope: dict[str, Any]) -> Any:
    toks = _tokens(expr.strip())
    if not toks:
        raise GoTemplateError("empty pipeline")
    head, args = toks[0], toks[1:]
    if head == "and":
        value: Any = None
        for a in args:
            value = _value(a, dot, scope)
            if not _truth(value):
                return value
        return value
    if head in FUNCS:
        return FUNCS[head](*(_value(a, dot, scope) for a in args))
    if args:
        raise GoTemplateError(f"unsupported function {head!r}")
    return _value(head, dot, scope)


def _run(block: list[Any], dot: Any, scope: dict[str, Any], out: list[str]) -> None:
    for node in block:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "if":
            for cond, body in node[1]:
                if cond is None or _truth(_eval(cond, dot, scope)):
                    _run(body, dot, scope, out)
                    break
        elif kind == "range":
            _, names, pipe, body = node
            for idx, item in enumerate(_eval(pipe, dot, scope) or []):
                if names:
                    scope[names[0]] = idx if len(names) == 2 else item
                if len(names) == 2:
                    scope[names[1]] = item
                _run(body, item, scope, out)
        else:
            m = re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", node[1], re.S)
            if m:
                if m.group(2) == "=" and m.group(1) not in scope:
                    raise GoTemplateError(f"assignment to undeclared {m.group(1)}")
                scope[m.group(1)] = _eval(m.group(3), dot, scope)
            else:
                value = _eval(node[1], dot, scope)
                out.append("" if value is None else str(value))


def render_go(source: str, data: dict[str, Any]) -> str:
    """Render `source` with `data` as its dot (and `$`)."""
    block, _, _ = _parse(_nodes(source), 0, ())
    out: list[str] = []
    _run(block, data, {"$": data}, out)
    return "".join(out)


def render_ollama(source: str, system: str, messages: list[dict[str, str]]) -> str:
    """Render the way Ollama calls a messages template: .System joined, .Messages with Role/Content."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return render_go(source, {"System": system, "Messages": msgs, "Prompt": "", "Response": ""})
