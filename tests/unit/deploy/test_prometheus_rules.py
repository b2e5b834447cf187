"""deploy/prometheus/backupmx-alerts.yml: `promtool check rules` accepts it, `promtool test rules` runs
backupmx-alerts.test.yml (each alert fires on series shaped like our /metrics, and stays quiet where it
should), and every metric either file names is one backupmx exports: a renamed metric breaks this test,
not an operator's alerting."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from backupmx.admin.metrics import METRICS
from backupmx.monitor.canary import METRICS as CANARY_METRICS

HERE = Path(__file__).resolve().parent
RULES = HERE.parents[2] / "deploy" / "prometheus" / "backupmx-alerts.yml"
RULES_TEST = HERE / "backupmx-alerts.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
EXPORTED = set(METRICS) | set(CANARY_METRICS)


@needs_promtool
def test_promtool_check_rules() -> None:
    assert PROMTOOL is not None
    res = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    assert PROMTOOL is not None
    res = subprocess.run(
        [PROMTOOL, "test", "rules", RULES_TEST.name], capture_output=True, text=True, timeout=60, cwd=HERE
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", [RULES, RULES_TEST], ids=lambda p: p.name)
def test_only_metrics_we_export(path: Path) -> None:
    named = set(re.findall(r"\bbackupmx_[a-z0-9_]+", path.read_text()))
    named = {n for n in named if not n.startswith("backupmx_alerts")}  # the file's own name
    assert named, path
    assert named <= EXPORTED, sorted(named - EXPORTED)


def test_every_alert_is_tested() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert alerts and alerts == tested
