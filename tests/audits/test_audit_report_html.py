"""Issue 16 item 9: the HTML audit report is for people.

It opens with what it covers (release, devices, packets, date, software version), shows numbers
rounded, and keeps the raw JSON, byte for byte ``audit.json``, in a collapsed ``<details>``.
One small real audit (a reduced profile: few canaries, shadows and trials; the device's own RD
schedule) feeds every test.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from diredi_secure.audits.profiles import AuditProfile
from diredi_secure.audits.report import (
    ReportScope,
    human,
    report_html,
    report_json,
    write_report,
)

SMALL = AuditProfile("small", canaries=16, shadows=2, trials=50, shipped_epochs=1,
                     surrogate_epochs=2, reconstruction_iterations=2, reconstruction_trials=1)
WHEN = datetime(2026, 12, 3, 14, 5, 9, tzinfo=UTC)


@pytest.fixture(scope="module")
def result() -> Any:
    from diredi_secure.audits.suite import AuditConfig, run_audit

    return run_audit(AuditConfig(epsilon=1.0, profile=SMALL, seed=0))


@pytest.fixture(scope="module")
def written(result: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The report of a release gate, written once (the plots take seconds)."""
    scope = ReportScope(created_at=WHEN, release="v2", devices=("device-B", "device-A"),
                        packets=3)
    return write_report(result, tmp_path_factory.mktemp("report"), scope=scope)


def _scope_table(page: str) -> dict[str, str]:
    table = re.search(r"<table class=kv id=scope>(.*?)</table>", page, re.S)
    assert table is not None, "no scope table"
    rows = re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", table.group(1), re.S)
    return {k: html.unescape(re.sub(r"<[^>]+>", "", v)) for k, v in rows}


@pytest.mark.audit_e2e
def test_a_release_report_opens_with_what_it_covers(written: tuple[Path, Path, str]) -> None:
    json_path, html_path, _ = written
    page = html_path.read_text(encoding="utf-8")
    # the scope comes first, right under the title with the verdict
    assert page.index("What this report covers") < page.index("Threat model")
    assert page.index("</h1>") < page.index("What this report covers")
    rows = _scope_table(page)
    assert rows["Release"] == "v2"
    assert rows["Devices"] == "device-A, device-B (2)"
    assert rows["Packets"].startswith("3 packet(s)")
    assert rows["Date"] == "2026-12-03T14:05:09Z"
    assert rows["Software"].startswith("diredi-secure ")
    assert rows["Claim audited"] == "epsilon 1 at delta 1e-05 (total per packet)"
    data = json.loads(json_path.read_bytes())
    assert data["scope"]["release"] == "v2" and data["scope"]["packets"] == 3
    assert data["scope"]["created_at"] == "2026-12-03T14:05:09Z"


@pytest.mark.audit_e2e
def test_a_report_without_a_release_says_what_it_does_not_cover(result: Any) -> None:
    page = report_html(result, report_json(result, scope=ReportScope(created_at=WHEN)))
    rows = _scope_table(page)
    assert rows["Release"].startswith("none: a standalone audit")
    assert rows["Devices"].startswith("none enrolled: a simulated device trained on scenario user A")
    assert rows["Packets"].startswith("none stored")
    # written by the release gate but not told which release: it must not claim "standalone"
    gated = report_html(result, report_json(result, release_gate={"verdict": "pass"},
                                            scope=ReportScope(created_at=WHEN)))
    rows = _scope_table(gated)
    assert rows["Release"].startswith("not named here: written by the release gate")
    assert "standalone" not in " ".join(rows.values())


@pytest.mark.audit_e2e
def test_the_raw_json_is_in_a_collapsed_details_and_is_audit_json(
        written: tuple[Path, Path, str]) -> None:
    json_path, html_path, digest = written
    page = html_path.read_text(encoding="utf-8")
    details = re.search(r"<details id=raw-json>(.*?)</details>", page, re.S)
    assert details is not None
    assert "<details id=raw-json open" not in page  # collapsed
    assert "<summary>" in details.group(1)
    pre = re.search(r"<pre>(.*)</pre>", details.group(1), re.S)
    assert pre is not None
    assert html.unescape(pre.group(1)).encode() == json_path.read_bytes()
    assert "SHA-256" in details.group(1)
    assert hashlib.sha256(json_path.read_bytes()).hexdigest() == digest


@pytest.mark.audit_e2e
def test_numbers_outside_the_raw_json_are_rounded_for_people(
        written: tuple[Path, Path, str]) -> None:
    page = written[1].read_text(encoding="utf-8")
    body = page.split("<details id=raw-json>")[0]
    body = re.sub(r'src="data:image/png;base64,[^"]*"', "", body)  # plots are not numbers
    # at most 3 decimals, or 3 significant digits (0.0625, 0.00123)
    unrounded = [m.group(0) for m in re.finditer(r"\d+\.(\d+)", body)
                 if len(m.group(1)) > 3 and len(m.group(1).lstrip("0")) > 3]
    assert not unrounded, unrounded[:5]
    # the exact values are still in the JSON the page carries
    assert re.search(r"\d+\.\d{8,}", page.split("<details id=raw-json>")[1])


@pytest.mark.parametrize(("value", "text"), [
    (0.9543081108234547, "0.954"), (0.9999999999920349, "1"), (1e-05, "1e-05"),
    (13.508939149332331, "13.5"), (8069, "8,069"), (12345.6, "12,346"), (True, "yes"),
    (float("inf"), "inf"), (None, "-"), (0.0, "0"),
])
def test_human_rounding(value: object, text: str) -> None:
    assert human(value) == text
