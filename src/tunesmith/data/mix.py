"""Several datasets in one run: read each with its own format/columns/system, then mix by share.

A dataset without a `share` contributes all its rows. With shares, the mix is the largest
one that gives every dataset its share without repeating a row: datasets with a share
take `share` of the mix, the others split the rest in proportion to their size; rows left
out are chosen at random (seeded), kept in file order, and counted in the report.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from tunesmith.config import DataOptions, DatasetSpec
from tunesmith.data.conversation import Conversation
from tunesmith.data.readers import ReadReport, read_conversations


@dataclass
class MixReport:
    """Per dataset: what reading found and how many rows went into the mix."""

    reports: list[ReadReport] = field(default_factory=list)
    used: list[int] = field(default_factory=list)

    def combined(self) -> ReadReport:
        """One report over all datasets (counts summed; formats and mappings joined)."""
        out = ReadReport(source=", ".join(r.source for r in self.reports))
        for report in self.reports:
            out.rows_read += report.rows_read
            out.rows_invalid += report.rows_invalid
            out.problems.extend(report.problems)
        out.format = ", ".join(dict.fromkeys(r.format for r in self.reports))
        out.columns = "; ".join(dict.fromkeys(r.columns for r in self.reports if r.columns))
        return out

    def lines(self) -> list[str]:
        """One line per dataset, e.g. "a.jsonl: 300 of 1,000 rows (30% of the mix), format qa"."""
        total = sum(self.used) or 1
        out = []
        for report, used in zip(self.reports, self.used):
            valid = report.rows_read - report.rows_invalid
            count = f"{used:,} of {valid:,} rows" if used != valid else f"{used:,} rows"
            share = f" ({used / total:.0%} of the mix)" if len(self.reports) > 1 else ""
            out.append(f"{report.source}: {count}{share}, format {report.format}"
                       + (f"; columns: {report.columns}" if report.columns else ""))
        return out

    def as_stats(self) -> list[dict[str, object]]:
        """The mix as plain data (for stats / the cache's meta.json)."""
        return [{"source": r.source, "format": r.format, "columns": r.columns, "rows_read": r.rows_read,
                 "rows_invalid": r.rows_invalid, "used": used} for r, used in zip(self.reports, self.used)]


def read_dataset(spec: DatasetSpec, options: DataOptions, log: Callable[[str], None]) -> tuple[
        list[Conversation], ReadReport]:
    """One dataset with its own format/columns/system (else the run's); skipped rows are logged."""
    convs, report = read_conversations(spec.path, spec.format or options.format, spec.columns or options.columns,
                                       spec.system if spec.system is not None else options.system,
                                       options.skip_invalid)
    if report.rows_invalid:
        log(f"warning: skipped {report.rows_invalid} invalid rows of {report.rows_read} in {spec.path} "
            f"(--skip-invalid); the first ones:")
        for line in report.problems[:5]:
            log(f"  {line}")
    return convs, report


def mix_counts(sizes: list[int], shares: list[float | None]) -> list[int]:
    """Rows to take from each dataset so each gets its share, none repeating a row (see the module doc)."""
    if all(s is None for s in shares):
        return list(sizes)
    given = sum(s for s in shares if s is not None)
    rest = sum(n for n, s in zip(sizes, shares) if s is None)
    parts = [s if s is not None else (1 - given) * n / rest for n, s in zip(sizes, shares)]
    total = min(n / p for n, p in zip(sizes, parts) if p > 0)
    return [min(n, math.floor(total * p + 1e-6)) for n, p in zip(sizes, parts)]


def take(convs: list[Conversation], n: int, seed: int) -> list[Conversation]:
    """`n` of the conversations, chosen at random (seeded), in their file order."""
    if n >= len(convs):
        return convs
    keep = sorted(random.Random(seed).sample(range(len(convs)), n))
    return [convs[i] for i in keep]


def read_mix(specs: list[DatasetSpec], options: DataOptions, seed: int,
             log: Callable[[str], None]) -> tuple[list[Conversation], MixReport]:
    """Read every dataset, then mix them by share (all rows of each when no shares are given)."""
    mix = MixReport()
    parts = []
    for spec in specs:
        convs, report = read_dataset(spec, options, log)
        parts.append(convs)
        mix.reports.append(report)
    mix.used = mix_counts([len(p) for p in parts], [s.share for s in specs])
    mixed: list[Conversation] = []
    for n, (convs, count) in enumerate(zip(parts, mix.used)):
        mixed.extend(take(convs, count, seed + n))
    return mixed, mix
