"""`tunesmith data inspect` on preference data: each pair as DPO / ORPO train it.

A pair trains two sequences that share one prompt: prompt + chosen reply and prompt +
rejected reply (`data.pairs`). Inspection shows the prompt once (context only), then the
chosen and the rejected reply with their trained tokens marked exactly as SFT inspection
marks them, and counts pairs: trainable, refused (identical replies, no room for a reply
within --max-length; FILE:LINE each) and with a reply truncated.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunesmith.config import DataOptions
from tunesmith.data.conversation import Conversation
from tunesmith.data.inspect import render_marked
from tunesmith.data.pairs import MAX_LISTED, TokenizedPair, tokenize_pairs
from tunesmith.data.prepare import data_stats, preflight
from tunesmith.data.readers import ReadReport
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample, TokenizeReport
from tunesmith.errors import UserError


def prompt_length(sample: TokenizedSample) -> int:
    """How many leading tokens carry no loss: the prompt of a pair's sequence."""
    return next((i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX), len(sample.labels))


def print_pair(console: Console, tokenizer: Any, pair: TokenizedPair) -> None:
    """One pair: a header with the token counts, the shared prompt, then each reply with its trained span."""
    colour = console.is_terminal and not console.no_color
    chosen, rejected = pair.sequences()
    prompt = prompt_length(chosen)
    head = (f"── {pair.source} · pair: prompt {prompt} tokens, chosen {chosen.num_trained} trained, "
            f"rejected {rejected.num_trained} trained ")
    console.print(Text(head + "─" * max(0, 60 - len(head)), style="bold cyan"))
    console.print(render_marked(tokenizer, TokenizedSample(chosen.input_ids[:prompt], chosen.labels[:prompt]), colour))
    for name, sequence, style in (("chosen", chosen, "bold green"), ("rejected", rejected, "bold red")):
        start = prompt_length(sequence)
        reply = TokenizedSample(sequence.input_ids[start:], sequence.labels[start:])
        console.print(Text.assemble((f"{name}: ", style), render_marked(tokenizer, reply, colour)))
    if not colour:
        console.print("")


def inspect_pairs(console: Console, tokenizer: Any, convs: list[Conversation], read_report: ReadReport,
                  options: DataOptions, samples: int, eot: list[int]) -> dict[str, Any]:
    """Print the first pairs, the pair counts and every refusal; return the stats.

    Pairs are tokenized by the preference objectives' own hook, so what is shown is what
    `--objective dpo` / `orpo` train. A refusal is listed (not raised at the first one) and
    then raised as training would raise it, unless --skip-invalid would skip it.
    """
    pairs, report = tokenize_pairs(convs, tokenizer, dataclasses.replace(options, skip_invalid=True))
    refused, report.dropped = report.dropped, []
    for pair in pairs[:samples]:
        print_pair(console, tokenizer, pair)
    stats = data_stats(read_report, report, TokenizeReport(), options.max_length)
    stats.update(pairs=len(pairs), refused_pairs=len(refused), truncated_pairs=report.truncated,
                 chosen_trained_tokens=sum(p.sequences()[0].num_trained for p in pairs),
                 rejected_trained_tokens=sum(p.sequences()[1].num_trained for p in pairs))
    console.print(pair_table(stats))
    if refused:
        verdict = "skipped (--skip-invalid)" if options.skip_invalid else "training would refuse to start"
        console.print(Text(f"refused: {len(refused)} pair(s) cannot train ({verdict}):", style="bold red"))
        for line in refused[:MAX_LISTED]:
            console.print(Text(f"  {line}", style="red"))
        if not options.skip_invalid:
            console.print(Text("pre-flight: FAILED (training would refuse to start)", style="bold red"))
            raise UserError(f"{len(refused)} of {len(convs)} preference pairs cannot train",
                            refused[:MAX_LISTED] + ["fix: remove or correct those rows, raise --max-length for "
                                                    "long prompts, or pass --skip-invalid to skip them"])
    try:
        preflight(pairs, report, TokenizeReport(), eot, options, lambda line: console.print(Text(line, style="yellow")))
    except UserError:
        console.print(Text("pre-flight: FAILED (training would refuse to start)", style="bold red"))
        raise
    console.print(Text("pre-flight: ok (for --objective dpo or orpo)", style="bold green"))
    return stats


def pair_table(stats: dict[str, Any]) -> Table:
    """The pair counts and token figures as a two-column table."""
    table = Table(title="preference data", show_header=False, title_justify="left", box=None, padding=(0, 2))
    length = stats["length"]
    pairs = stats["pairs"] or 1  # the means of no pairs are 0
    rows = [
        ("rows read", f"{stats['rows_read']:,}"),
        ("rows invalid", f"{stats['rows_invalid']:,}" + (" (skipped)" if stats["rows_invalid"] else "")),
        ("pairs", f"{stats['pairs']:,} trainable"),
        ("refused pairs", f"{stats['refused_pairs']:,}" + (" (listed below)" if stats["refused_pairs"] else "")),
        ("tokens per pair", f"prompt + longer reply: min {length['min']} · median {length['median']} · "
                            f"p95 {length['p95']} · max {length['max']}"),
        ("reply tokens trained", f"chosen {stats['chosen_trained_tokens'] / pairs:.1f} · rejected "
                                 f"{stats['rejected_trained_tokens'] / pairs:.1f} per pair (mean)"),
        ("tokens trained", f"{stats['trained_share']:.1%} ({stats['trained_tokens']:,} of {stats['tokens']:,}; "
                           "the prompt is in both sequences and never trained)"),
        (f"over --max-length {stats['max_length']}", f"{stats['truncated_pairs']:,} pairs"
         + (" (replies truncated, never the prompt)" if stats["truncated_pairs"] else "")),
    ]
    for name, value in rows:
        table.add_row(Text(name, style="bold"), value)
    return table
