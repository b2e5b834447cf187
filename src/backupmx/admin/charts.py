"""Charts drawn on the server as inline SVG: nothing loads from anywhere, no script runs.

The plot is an SVG whose viewBox is the time window in minutes (x) by 0..100 (y), stretched to the box
(`preserveAspectRatio="none"`, strokes kept thin with `non-scaling-stroke`); axis labels and legends are
HTML around it, so text stays readable from a phone to a wide screen. Shapes carry classes, the colours
live in the stylesheet (the page's CSP allows no inline styles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

from backupmx.admin.timeseries import SeriesPoint
from backupmx.spool import OutagePeriod


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^n that is >= value (at least 1), for a y axis top."""
    if value <= 1:
        return 1.0
    exp = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        top = step * 10**exp
        if top >= value:
            return float(top)
    return float(10.0 ** (exp + 1))


def _fmt(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k".replace(".0k", "k")
    return f"{v:.1f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))


def _x_labels(hours: float) -> Markup:
    step = 6 if hours >= 12 else max(1, int(hours // 4) or 1)
    labels = []
    h = int(hours)
    while h > 0:
        labels.append(f"{h}h ago")
        h -= step
    labels.append("now")
    return Markup("".join(f"<span>{escape(t)}</span>" for t in labels))


def _outage_rects(outages: Sequence[OutagePeriod], start: float, now: float, height: float) -> list[str]:
    out = []
    for o in outages:
        a = max(o.started_at, start)
        b = now if o.ended_at is None else min(o.ended_at, now)
        if b <= start or a >= now:
            continue
        x0, x1 = (a - start) / 60.0, (b - start) / 60.0
        out.append(f'<rect class="c-outage" x="{x0:.1f}" y="0" width="{max(x1 - x0, 2.0):.1f}" height="{height}"/>')
    return out


def _chart(
    svg_body: list[str],
    minutes: float,
    top: float,
    unit: str,
    label: str,
    hours: float,
    legend: list[tuple[str, str]],
    css: str = "",
) -> Markup:
    grid = "".join(
        f'<line class="c-grid" x1="0" x2="{minutes:.0f}" y1="{y}" y2="{y}" vector-effect="non-scaling-stroke"/>'
        for y in (0, 50, 100)
    )
    svg = (
        f'<svg class="c-plot" viewBox="0 0 {minutes:.0f} 100" preserveAspectRatio="none" role="img" '
        f'aria-label="{escape(label)}">{grid}{"".join(svg_body)}</svg>'
    )
    legend_html = "".join(
        f'<span class="c-key"><i class="c-swatch {escape(c)}"></i>{escape(t)}</span>' for c, t in legend
    )
    return Markup(
        f'<figure class="chart {escape(css)}"><figcaption>{escape(label)}'
        f'<span class="c-legend">{legend_html}</span></figcaption>'
        f'<div class="c-body"><div class="c-y"><span>{escape(_fmt(top))}{escape(unit)}</span>'
        f"<span>{escape(_fmt(top / 2))}</span><span>0</span></div>{svg}"
        f'<div class="c-x">{_x_labels(hours)}</div></div></figure>'
    )


def _bucket(points: Sequence[SeriesPoint], start: float, bucket_minutes: int, n: int) -> list[list[SeriesPoint]]:
    buckets: list[list[SeriesPoint]] = [[] for _ in range(n)]
    for p in points:
        i = int((p.at - start) // (bucket_minutes * 60))
        if 0 <= i < n:
            buckets[i].append(p)
    return buckets


def depth_chart(
    points: Sequence[SeriesPoint],
    outages: Sequence[OutagePeriod],
    *,
    now: float,
    hours: float = 24.0,
    bucket_minutes: int = 5,
) -> Markup:
    """Queue depth (recipients waiting, the held part darker) with declared outages shaded behind."""
    minutes = hours * 60.0
    start = now - minutes * 60.0
    n = int(minutes // bucket_minutes)
    buckets = _bucket(points, start, bucket_minutes, n)
    # the depth of a bucket is its last sample: a queue is a level, not a flow
    depth = [(b[-1].depth, b[-1].held) if b else None for b in buckets]
    top = nice_ceiling(max((d[0] for d in depth if d), default=0))
    body = _outage_rects(outages, start, now, 100)
    total, held = _area(depth, 0, top, bucket_minutes), _area(depth, 1, top, bucket_minutes)
    if total:
        body.append(f'<path class="c-depth" d="{total}"/>')
    if held:
        body.append(f'<path class="c-held" d="{held}"/>')
    legend = [("c-depth", "waiting"), ("c-held", "held"), ("c-outage", "outage")]
    return _chart(body, minutes, top, "", f"Queue depth, last {hours:g} h (recipients)", hours, legend)


def _area(values: Sequence[tuple[int, int] | None], idx: int, top: float, bucket_minutes: int) -> str:
    """Closed area paths over runs of buckets that have data (gaps stay gaps)."""
    paths: list[str] = []
    run: list[tuple[float, float]] = []

    def flush() -> None:
        if run:
            x0, x1 = run[0][0], run[-1][0] + bucket_minutes
            pts = " ".join(f"L{x:.0f},{y:.2f}" for x, y in run)
            last_y = run[-1][1]
            paths.append(f"M{x0:.0f},100 {pts} L{x1:.0f},{last_y:.2f} L{x1:.0f},100 Z")
            run.clear()

    for i, v in enumerate(values):
        if v is None:
            flush()
            continue
        run.append((i * bucket_minutes, 100.0 - 100.0 * v[idx] / top))
    flush()
    return " ".join(paths)


def rates_chart(
    points: Sequence[SeriesPoint],
    outages: Sequence[OutagePeriod],
    *,
    now: float,
    hours: float = 24.0,
    bucket_minutes: int = 10,
) -> Markup:
    """Arrivals and deliveries per minute, averaged over `bucket_minutes`."""
    minutes = hours * 60.0
    start = now - minutes * 60.0
    n = int(minutes // bucket_minutes)
    buckets = _bucket(points, start, bucket_minutes, n)
    arrived = [sum(p.arrived for p in b) / bucket_minutes if b else None for b in buckets]
    delivered = [sum(p.delivered for p in b) / bucket_minutes if b else None for b in buckets]
    top = nice_ceiling(max((v for v in arrived + delivered if v is not None), default=0))
    body = _outage_rects(outages, start, now, 100)
    # deliveries first: arrivals, dashed, stay visible on top where the two lines meet
    for cls, series in (("c-delivered", delivered), ("c-arrived", arrived)):
        d = _line(series, top, bucket_minutes)
        if d:
            body.append(f'<path class="{cls}" d="{d}" vector-effect="non-scaling-stroke"/>')
    legend = [("c-arrived", "arrivals"), ("c-delivered", "deliveries")]
    return _chart(
        body, minutes, top, "/min", f"Arrivals and deliveries per minute, last {hours:g} h", hours, legend, css="rates"
    )


def _line(values: Sequence[float | None], top: float, bucket_minutes: int) -> str:
    parts: list[str] = []
    pen_down = False
    for i, v in enumerate(values):
        if v is None:
            pen_down = False
            continue
        x = i * bucket_minutes + bucket_minutes / 2
        y = 100.0 - 100.0 * v / top
        parts.append(f"{'L' if pen_down else 'M'}{x:.0f},{y:.2f}")
        pen_down = True
    return " ".join(parts)


def outage_timeline(
    outages: Sequence[OutagePeriod], *, now: float, hours: float = 24.0, down_now: bool = False
) -> Markup:
    """A bar over the window: green while the primary was serving, red while an outage was declared."""
    minutes = hours * 60.0
    start = now - minutes * 60.0
    rects = _outage_rects(outages, start, now, 10)
    n = len(rects)
    label = (
        f"Primary over the last {hours:g} h: "
        + (f"{n} declared outage{'s' if n != 1 else ''}" if n else "no declared outage")
        + (", down now" if down_now else "")
    )
    svg = (
        f'<svg class="c-timeline" viewBox="0 0 {minutes:.0f} 10" preserveAspectRatio="none" role="img" '
        f'aria-label="{escape(label)}"><rect class="c-up" x="0" y="0" width="{minutes:.0f}" height="10"/>'
        f"{''.join(rects)}</svg>"
    )
    return Markup(
        f'<figure class="timeline"><figcaption>{escape(label)}</figcaption>{svg}'
        f'<div class="c-x">{_x_labels(hours)}</div></figure>'
    )
