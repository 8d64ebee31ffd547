"""The overview's charts as server-rendered SVG: stacked bars per hour (24 hours) or day (30 days), one colour
per state. Values in, markup out; only numbers, fixed state names and bucket labels reach the markup."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from markupsafe import Markup, escape

if TYPE_CHECKING:
    from connector.ledger.console import Bucket

SERIES = (  # state, colour, label
    ("sent", "#2e7d32", "sent"),
    ("failed", "#c62828", "failed"),
    ("in_doubt", "#ef6c00", "in doubt"),
    ("skipped", "#6d6d6d", "skipped"),
    ("cancelled", "#9e9e9e", "cancelled"),
)
WIDTH, HEIGHT, LEFT, BOTTOM = 720, 180, 40, 22


def slots(now: datetime, unit: str) -> list[str]:
    """The bucket labels of the chart, oldest first: the last 24 hours or the last 30 days (UTC)."""
    if unit == "hour":
        top = now.replace(minute=0, second=0, microsecond=0)
        return [(top - timedelta(hours=i)).strftime("%Y-%m-%d %H") for i in range(23, -1, -1)]
    return [(now - timedelta(days=i)).strftime("%Y-%m-%d") for i in range(29, -1, -1)]


def stacked_bars(buckets: Sequence[Bucket], labels: Sequence[str], title: str) -> Markup:
    counts: dict[tuple[str, str], int] = {}
    for b in buckets:
        counts[(b.start, b.state)] = counts.get((b.start, b.state), 0) + b.count
    totals = [sum(counts.get((label, state), 0) for state, _, _ in SERIES) for label in labels]
    peak = max([*totals, 1])
    step = (WIDTH - LEFT) / max(len(labels), 1)
    plot = HEIGHT - BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT + 20}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
        f'<line x1="{LEFT}" y1="{plot}" x2="{WIDTH}" y2="{plot}" stroke="#999"/>',
        f'<text x="{LEFT - 4}" y="10" text-anchor="end" font-size="10">{peak}</text>',
        f'<text x="{LEFT - 4}" y="{plot}" text-anchor="end" font-size="10">0</text>',
    ]
    for i, label in enumerate(labels):
        x, y = LEFT + i * step + 1, float(plot)
        for state, colour, name in SERIES:
            count = counts.get((label, state), 0)
            if not count:
                continue
            h = (plot - 12) * count / peak
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(step - 2, 1):.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{escape(label)}: {count} {name}</title></rect>"
            )
        if i % max(len(labels) // 6, 1) == 0:
            short = label[11:13] + ":00" if len(label) > 10 else label[5:]
            parts.append(f'<text x="{x:.1f}" y="{plot + 14}" font-size="10">{escape(short)}</text>')
    legend_x = LEFT
    for _, colour, name in SERIES:
        parts.append(f'<rect x="{legend_x}" y="{HEIGHT + 6}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="{HEIGHT + 15}" font-size="11">{name}</text>')
        legend_x += 90
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - built above from numbers, fixed names and escaped labels
