"""report.html: one self-contained page (inline CSS, the loss curve as a data: URI, no scripts).

It opens offline from anywhere: nothing is fetched, so it can be mailed or attached to a
model card. Every piece of user text is HTML-escaped.
"""
from __future__ import annotations

import base64
import datetime
from html import escape
from pathlib import Path
from typing import Any

from tunesmith.eval.metrics import normalize
from tunesmith.eval.table import metric_rows, skipped_lines, table_header

CSS = """
:root { --ink:#1f2430; --muted:#6b7280; --line:#e5e7eb; --bg:#f7f7f9; --card:#fff;
        --good:#15803d; --good-bg:#dcfce7; --bad:#b91c1c; --bad-bg:#fee2e2; --accent:#4f46e5; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width:1100px; margin:0 auto; padding:32px 24px 64px; }
h1 { font-size:26px; margin:0 0 4px; } h2 { font-size:18px; margin:36px 0 12px; }
.sub { color:var(--muted); margin:0 0 24px; } code { font-size:13px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 20px;
        box-shadow:0 1px 2px rgba(0,0,0,.04); }
table { border-collapse:collapse; width:100%; }
th, td { padding:8px 12px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th:first-child, td:first-child { text-align:left; white-space:normal; }
th { white-space:normal; overflow-wrap:break-word; }
.scroll { overflow-x:auto; }
th { font-size:12px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); font-weight:600; }
tr:last-child td { border-bottom:none; }
td.ref { color:var(--muted); }
.delta { display:inline-block; padding:1px 8px; border-radius:999px; font-variant-numeric:tabular-nums; }
.delta.good { color:var(--good); background:var(--good-bg); } .delta.bad { color:var(--bad); background:var(--bad-bg); }
td { font-variant-numeric:tabular-nums; }
.skipped { color:var(--muted); font-size:13px; margin:10px 0 0; padding-left:18px; }
.curve img { display:block; max-width:100%; margin:0 auto; }
.example { margin:0 0 18px; }
.example h3 { margin:0 0 10px; font-size:13px; color:var(--muted); font-weight:600; }
.label { font-size:11px; text-transform:uppercase; letter-spacing:.05em; color:var(--muted); font-weight:600;
         margin:0 0 4px; }
.text { white-space:pre-wrap; word-wrap:break-word; margin:0; padding:10px 12px; border-radius:8px;
        background:var(--bg); font-size:14px; }
.prompt .text { background:#eef2ff; } .ref .text { background:#f0fdf4; }
.reply .text { border-left:3px solid #d1d5db; } .reply.tuned .text { border-left-color:var(--accent); }
.row { display:grid; grid-template-columns:1fr 1fr; gap:14px; margin-top:12px; }
.row.one { grid-template-columns:1fr; }
@media (max-width:720px) { .row { grid-template-columns:1fr; } th, td { padding:6px; } }
.match { color:var(--good); font-weight:600; text-transform:none; letter-spacing:0; }
.empty { color:var(--muted); font-style:italic; }
"""


def _text_block(label: str, text: str | None, css: str = "", note: str = "") -> str:
    """A labelled block of preformatted user text."""
    body = (f'<p class="text">{escape(text)}</p>' if text
            else '<p class="text empty">(empty reply)</p>' if text == "" else '<p class="text empty">(none)</p>')
    return f'<div class="{css}"><p class="label">{escape(label)}{note}</p>{body}</div>'


def _prompt_html(prompt: list[dict[str, str]]) -> str:
    """The prompt messages; the role is named when there is more than one message."""
    if len(prompt) == 1:
        return _text_block("prompt", prompt[0]["content"], "prompt")
    return "".join(_text_block(f"prompt · {m['role']}", m["content"], "prompt") for m in prompt)


def _match_note(reply: str | None, reference: str | None) -> str:
    """A small 'exact match' mark when a reply equals the reference after normalising."""
    if reply is None or reference is None or normalize(reply) != normalize(reference):
        return ""
    return ' · <span class="match">exact match</span>'


def _examples_html(result: dict[str, Any], names: tuple[str, str | None]) -> str:
    """One card per prompt: prompt, reference, then the base and tuned replies side by side."""
    has_base = "base" in result
    cards = []
    for n, ex in enumerate(result["examples"], start=1):
        replies = []
        if has_base:
            replies.append(_text_block(names[1] or "base", ex.get("base_reply"), "reply",
                                       _match_note(ex.get("base_reply"), ex["reference"])))
        replies.append(_text_block(names[0], ex["reply"], "reply tuned", _match_note(ex["reply"], ex["reference"])))
        reference = _text_block("reference", ex["reference"], "ref") if ex["reference"] is not None else ""
        cards.append(f'<section class="card example"><h3>{n} · {escape(ex["source"])}</h3>'
                     f'{_prompt_html(ex["prompt"])}<div class="row one" style="margin-top:10px">{reference}</div>'
                     f'<div class="row{"" if has_base else " one"}">{"".join(replies)}</div></section>')
    return "".join(cards)


def _table_html(result: dict[str, Any], names: tuple[str, str | None]) -> str:
    """The metric table; the change is green when it moved the good way, red when the bad way."""
    has_base = "base" in result
    has_ref = bool(result.get("reference"))
    head = table_header(result, names)
    rows = []
    for r in metric_rows(result):
        tone = {True: " good", False: " bad", None: ""}[r["good"]]
        cells = [escape(r["label"]), *([r["base"]] if has_base else []), f"<b>{r['model']}</b>",
                 *([f'<span class="delta{tone}">{r["diff"]}</span>'] if has_base else [])]
        ref = f'<td class="ref">{r["reference"]}</td>' if has_ref else ""
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + ref + "</tr>")
    skipped = "".join(f"<li>{escape(line)}</li>" for line in skipped_lines(result))
    return (f'<div class="card scroll"><table><tr>{"".join(f"<th>{escape(h)}</th>" for h in head)}</tr>'
            f'{"".join(rows)}</table>{f"<ul class=skipped>{skipped}</ul>" if skipped else ""}</div>')


def _curve_html(loss_curve: Path | None) -> str:
    """The training loss curve embedded as a base64 data URI (nothing to fetch)."""
    if loss_curve is None:
        return ""
    data = base64.b64encode(loss_curve.read_bytes()).decode("ascii")
    return (f'<h2>Training loss</h2><div class="card curve">'
            f'<img alt="training loss curve" src="data:image/png;base64,{data}"></div>')


def render_html(result: dict[str, Any], names: tuple[str, str | None], loss_curve: Path | None) -> str:
    """The whole page."""
    title = f"{names[0]} vs {names[1]}" if "base" in result else names[0]
    samples = result["samples"]
    facts = [f"{samples['loss']} samples for the loss", f"{samples['prompts']} prompts, greedy decoding",
             datetime.datetime.now().strftime("%Y-%m-%d %H:%M")]
    if result.get("data"):
        facts.insert(0, f"data <code>{escape(str(result['data']))}</code>")
    examples = _examples_html(result, names)
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>tunesmith report · {escape(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>Evaluation: {escape(title)}</h1><p class=sub>{' · '.join(facts)}</p>"
            f"<h2>Metrics</h2>{_table_html(result, names)}{_curve_html(loss_curve)}"
            f"{'<h2>Replies</h2>' + examples if examples else ''}</main></body></html>\n")
