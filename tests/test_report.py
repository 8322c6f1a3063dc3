"""The report renderers on a hand-built result: table formatting, escaping, self-containment, skips."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tunesmith.eval.html import render_html
from tunesmith.eval.report import summary_text, write_reports
from tunesmith.eval.table import fmt, fmt_diff, metric_rows, render_markdown


def result(with_base: bool = True) -> dict[str, Any]:
    """A result as evaluate() returns it, with text that needs escaping."""
    out: dict[str, Any] = {
        "model": {"loss": 1.25, "exact_match": 0.5, "repetition_rate": 0.25, "uppercase_share": 0.9},
        "reference": {"uppercase_share": 1.0},
        "skipped": {"label_accuracy": "the references are free text, not a small label set"},
        "samples": {"loss": 10, "prompts": 2}, "data": "held/out.jsonl", "report": None,
        "examples": [
            {"source": "held/out.jsonl:1", "prompt": [{"role": "user", "content": "say <b>hi</b> & bye"}],
             "reference": "HI", "reply": "Hi!", "base_reply": "<script>alert(1)</script>"},
            {"source": "held/out.jsonl:2", "prompt": [{"role": "system", "content": "Shout."},
                                                      {"role": "user", "content": "see https://example.com"}],
             "reference": "OK", "reply": "", "base_reply": "ok then"},
        ],
    }
    if with_base:
        out["base"] = {"loss": 2.0, "exact_match": 0.0, "repetition_rate": 0.1, "uppercase_share": 0.1}
        out["difference"] = {k: out["model"][k] - out["base"][k] for k in out["base"]}
    else:
        for ex in out["examples"]:
            del ex["base_reply"]
    return out


def test_formatting_of_values_and_differences() -> None:
    assert fmt(0.5, "share") == "50.0%" and fmt(1.23456, "num") == "1.235" and fmt(123.45, "num") == "123.5"
    assert fmt(None, "num") == "–" and fmt(float("inf"), "num") == "inf"
    assert fmt_diff(0.125, "share") == "+12.5 pp" and fmt_diff(-0.75, "num") == "-0.750"
    assert fmt(6.0, "count") == "6.0" and fmt_diff(-2.5, "count") == "-2.5"  # lengths: one decimal


def test_rows_say_which_way_is_better() -> None:
    rows = {r["key"]: r for r in metric_rows(result())}
    assert list(rows) == ["loss", "exact_match", "repetition_rate", "uppercase_share"]  # table order, present only
    assert rows["loss"]["good"] is True  # loss went down
    assert rows["exact_match"]["good"] is True
    assert rows["repetition_rate"]["good"] is False  # more repetition is worse
    assert rows["uppercase_share"]["good"] is None  # depends on the task
    assert rows["uppercase_share"]["reference"] == "100.0%"


def test_html_escapes_text_and_fetches_nothing() -> None:
    html = render_html(result(), ("tuned", "base"), None)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "say &lt;b&gt;hi&lt;/b&gt; &amp; bye" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, flags=re.I)
    assert "https://example.com" in html  # user text stays visible, as text
    assert 'class="delta good"' in html and 'class="delta bad"' in html
    assert "skipped label accuracy: the references are free text" in html
    assert html.count("exact match</span>") == 1  # "Hi!" matches "HI" once normalised
    assert "(empty reply)" in html and "prompt · system" in html


def test_without_base_there_is_one_reply_column() -> None:
    html = render_html(result(with_base=False), ("model", None), None)
    assert html.count('class="reply') == 2 and "change" not in html
    md = render_markdown(result(with_base=False), ("model", None), None)
    assert "| metric | model | reference |" in md


def test_write_reports_embeds_the_loss_curve(tmp_path: Path) -> None:
    curve = tmp_path / "loss.png"
    curve.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    paths = write_reports(result(), tmp_path / "out" / "report.html", curve, ("tuned", "base"))
    html = Path(paths["html"]).read_text(encoding="utf-8")
    assert paths["md"] == str(tmp_path / "out" / "report.md")
    assert "data:image/png;base64,iVBORw0KGgpmYWtl" in html
    md = Path(paths["md"]).read_text(encoding="utf-8")
    assert "| loss on reply tokens | 2.000 | 1.250 | -0.750 |  |" in md
    assert "![training loss curve](../loss.png)" in md  # linked relative to report.md
    assert "```text\n<script>alert(1)</script>\n```" in md and "*(empty reply)*" in md


def test_summary_text_is_an_aligned_table() -> None:
    text = summary_text(result(), ("tuned", "base"))
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "base", "tuned", "change", "reference"]
    assert len({len(line) for line in lines[:6]}) == 1  # header, rule and rows align
    assert "exact match" in text and "+50.0 pp" in text
    assert lines[-1].startswith("skipped label accuracy:")


HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "**bold** _it_ # head", "a | b | c",
           "``` fence\n# not a heading\n```", "[click](javascript:alert(1))", "<!-- comment", "&amp; &lt;",
           "x\n---\ny", "`tick` ``two``"]


def hostile_result() -> dict[str, Any]:
    """Every string that comes from the user's data or names is hostile."""
    out = result()
    out["data"] = "data/`evil`|<b>.jsonl"
    out["examples"] = [{"source": f"{h}:1", "prompt": [{"role": "user", "content": h}], "reference": h,
                        "reply": h, "base_reply": h} for h in HOSTILE]
    return out


def test_html_escapes_every_hostile_string() -> None:
    from html.parser import HTMLParser

    names = ("tuned <i>x</i>", "base & <u>y</u>")
    html = render_html(hostile_result(), names, None)
    tags: list[str] = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append(tag)
            assert not any(k.startswith("on") for k, _ in attrs), (tag, attrs)

    Tags().feed(html)
    assert not {"script", "img", "i", "u", "a"} & set(tags), set(tags)
    assert tags.count("b") == len(metric_rows(hostile_result()))  # ours: the model's value in each row
    assert "<!-- comment" not in html and "&lt;!-- comment" in html
    assert "&amp;amp; &amp;lt;" in html  # entities in the data are shown, not interpreted


def unescape_html(text: str) -> str:
    from html import unescape

    return unescape(text)


def test_markdown_renders_hostile_strings_as_literal_text() -> None:
    from markdown_it import MarkdownIt

    names = ("tuned|<i>x</i>", "base `y`")
    md = render_markdown(hostile_result(), names, None)
    rendered = MarkdownIt("commonmark").enable("table").render(md)
    for tag in ("<script", "<img", "<b>", "<em>", "<a ", "<i>", "<!--", "<hr"):
        assert tag not in rendered, tag
    assert rendered.count("<strong>") == 4 * len(HOSTILE)  # ours: Prompt, Reference and the two model names
    assert rendered.count("<h2>") == len(HOSTILE)  # no heading smuggled in from the data
    header = rendered.split("<thead>", 1)[1].split("</thead>", 1)[0]
    assert header.count("<th") == 5  # metric, base, tuned, change, reference: the | in a name split nothing
    assert "tuned|&lt;i&gt;x&lt;/i&gt;" in header and "base `y`" in unescape_html(rendered)
    from html import unescape

    for h in HOSTILE:  # each text comes back exactly, as text
        assert unescape(rendered).count(f'<pre><code class="language-text">{h}\n</code></pre>') == 4, h
