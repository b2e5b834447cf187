"""Server-side SVG charts: scales, outage bands, no inline styles (the CSP forbids them), escaping."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from backupmx.admin.charts import depth_chart, nice_ceiling, outage_timeline, rates_chart
from backupmx.admin.timeseries import SeriesPoint
from backupmx.spool import OutagePeriod

NOW = 1_700_000_000.0


def test_nice_ceiling() -> None:
    assert [nice_ceiling(v) for v in (0, 1, 3, 7, 11, 240, 251, 999)] == [1, 1, 5, 10, 20, 250, 500, 1000]


def test_depth_chart_draws_area_and_outage_band() -> None:
    pts = [SeriesPoint(NOW - m * 60, "example.test", 100 - m, 5, 1, 0, 0, 0) for m in range(60, 0, -1)]
    out = [OutagePeriod("example.test", NOW - 3600, None)]
    html = str(depth_chart(pts, out, now=NOW))
    svg = re.search(r"<svg.*?</svg>", html, re.S)
    assert svg is not None
    root = ET.fromstring(svg.group(0))  # well-formed
    classes = [el.get("class") for el in root.iter()]
    assert "c-outage" in classes and "c-depth" in classes and "c-held" in classes
    assert "style=" not in html
    assert ">100<" in html  # y axis top: nice_ceiling(99)
    rect = next(el for el in root.iter() if el.get("class") == "c-outage")
    assert float(rect.get("x", "0")) == 1440 - 60  # the last hour of the 24 h window


def test_rates_and_timeline_and_empty_data() -> None:
    assert "<path" not in str(rates_chart([], [], now=NOW))
    html = str(rates_chart([SeriesPoint(NOW - 600, "d", 0, 0, 5, 2, 0, 0)], [], now=NOW))
    assert '<path class="c-arrived"' in html and '<path class="c-delivered"' in html
    t = str(outage_timeline([OutagePeriod("d", NOW - 7200, NOW - 3600)], now=NOW))
    assert "1 declared outage" in t and "down now" not in t
    t = str(outage_timeline([], now=NOW, down_now=True))
    assert "no declared outage, down now" in t
