"""The audit report: JSON (machine-readable, digest goes into the release attestation) and one
self-contained HTML page (plots embedded as base64 PNG, no external resource).

The page is for people: it opens with what the report covers (release, devices, packets, date,
software version), shows numbers rounded to three significant digits, and keeps the exact JSON
(the same bytes as ``audit.json``) in a collapsed ``<details>`` section at its end.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diredi_secure.errors import LocalError

if TYPE_CHECKING:
    from .suite import AuditResult

__all__ = ["REPORT_FORMAT", "THREAT_MODEL", "ReportScope", "report_html", "report_json",
           "write_report"]

REPORT_FORMAT = "diredi-audit-report/2"

THREAT_MODEL = (
    "Adversary: the cloud (or anyone holding a device's packets). It knows the shipped edge model, "
    "the public reference set, the RD algorithm and hyperparameters and, as differential privacy "
    "allows, every record of the user's data but the one in question (used for shadow runs). It "
    "sees the decoded payload of one packet. Unit of privacy: one training example of the user "
    "(add/remove one example, DP-SGD's neighbouring relation). The white-box channel attacks the "
    "DP-adapted model itself, which never leaves the device: an upper bound on any packet."
)


@dataclass(frozen=True)
class ReportScope:
    """What a report covers, beyond the audit itself: the release it gates, the devices whose
    packets that release merges and how many packets (``None``: a standalone audit, which trains
    and seals its own packets on a scenario user), and when it was written."""

    created_at: datetime
    release: str | None = None
    devices: Sequence[str] | None = None
    packets: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "release": self.release,
            "devices": None if self.devices is None else sorted(self.devices),
            "packets": self.packets,
            "created_at": self.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "software_version": software_version(),
        }


def software_version() -> str:
    """``diredi-secure X.Y.Z`` as installed (a source tree that was never installed says so)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"diredi-secure {version('diredi-secure')}"
    except PackageNotFoundError:
        return "diredi-secure (source tree, not installed)"


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else ("-inf" if x < 0 else "nan"))


def _clean(obj: object) -> object:
    if isinstance(obj, float):
        return _num(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.floating | np.integer):
        return _clean(obj.item())
    return obj


def report_json(
    result: AuditResult, *, release_gate: Mapping[str, object] | None = None,
    scope: ReportScope | None = None,
) -> dict[str, object]:
    """The report as JSON-ready data (non-finite floats as strings). ``release_gate``, when the
    release gate wrote the report, records its decision (profile, claimed epsilon, forced);
    ``scope`` what the report covers (absent: nothing beyond the audit's own runs)."""
    dp = result.dp
    out: dict[str, object] = {
        "format": REPORT_FORMAT,
        "summary": result.summary_line(),
        "text": result.text_lines(),
        "verdict": result.verdict,
        "implementation": result.config.implementation.value,
        "mechanisms": [m.to_json() for m in result.mechanisms],
        "noise_floor": None if result.noise_floor is None else result.noise_floor.to_json(),
        "release_attacks": [
            {**am.to_json(), "mechanism": name, "canary_audit": ca.to_json()}
            for name, am, ca in result.release_attacks
        ],
        "criteria": [{"name": n, "ok": ok, "detail": d} for n, ok, d in result.criteria],
        "leak_detected": result.leak_detected,
        "claimed_epsilon": result.claimed_epsilon,
        "delta": result.delta,
        "eps_lower_bound": result.eps_lower_bound,
        "best_attack": f"{result.best_attack.channel}/{result.best_attack.attack}",
        "threat_model": THREAT_MODEL,
        "dp_parameters": {
            "noise_multiplier": dp.noise_multiplier, "clip_norm": dp.clip_norm,
            "sample_rate": dp.sample_rate, "steps": dp.steps, "accountant": dp.accountant,
            "epsilon": dp.epsilon, "delta": dp.delta, "poisson_sampling": dp.poisson_sampling,
            "total_epsilon": dp.total_epsilon, "noise_seeded": dp.noise_seeded,
        },
        "accounting": result.accounting.to_json() if result.accounting is not None else None,
        "attacks": [
            {**a.metrics.to_json(), "channel": a.channel, "attack": a.attack,
             "canary_audit": a.canary_audit.to_json()}
            for a in result.attacks
        ],
        "natural_membership": [m.to_json() for m in result.natural],
        "inspection": result.inspection.to_json(),
        "reconstruction": result.reconstruction.to_json(),
        "utility": result.utility,
        "settings": result.settings,
        "seconds": result.seconds,
    }
    if release_gate is not None:
        out["release_gate"] = dict(release_gate)
    if scope is not None:
        out["scope"] = scope.to_json()
    return _clean(out)  # type: ignore[return-value]


def _png_eps(result: AuditResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=110)
    try:
        names = [f"{a.channel}\n{a.attack}" for a in result.attacks]
        vals = [a.canary_audit.epsilon_lower_bound for a in result.attacks]
        ax.barh(range(len(vals)), vals, color="tab:blue", label="eps lower bound (95%)")
        if math.isfinite(result.claimed_epsilon):
            ax.axvline(result.claimed_epsilon, color="tab:red", ls="--",
                       label=f"claimed eps = {result.claimed_epsilon:g}")
        ax.set_yticks(range(len(vals)), names, fontsize=6)
        ax.set_xlabel("epsilon")
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _png_recon(result: AuditResult) -> bytes | None:
    rec = result.reconstruction
    if rec.examples is None or rec.matches is None or len(rec.examples) == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    n = len(rec.examples)
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.4), dpi=110, squeeze=False)
    try:
        for i in range(n):
            axes[0][i].imshow(rec.examples[i].reshape(8, 8), cmap="gray", vmin=0, vmax=1)
            axes[1][i].imshow(rec.matches[i].reshape(8, 8), cmap="gray", vmin=0, vmax=1)
            axes[0][i].axis("off")
            axes[1][i].axis("off")
        axes[0][0].set_title("reconstruction", fontsize=6, loc="left")
        axes[1][0].set_title("closest private", fontsize=6, loc="left")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _img(png: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}">')


def human(value: object) -> str:
    """A value as a person reads it: floats to three significant digits (1e-05 stays 1e-05),
    integers with thousands separators, booleans as yes/no. The JSON keeps the exact values."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return _num(value)  # type: ignore[return-value]  # a str for non-finite values
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    if value is None:
        return "-"
    return str(value)


_LONG_NUMBER = re.compile(r"(?<![\w.])\d+\.\d{4,}(?![\d.])")


def rounded_text(text: str) -> str:
    """Free text from the suite (criteria details, its text lines) with every number of four or
    more decimals rounded as :func:`human` rounds it."""
    return _LONG_NUMBER.sub(lambda m: human(float(m.group(0))), text)


_MAX_LIST = 12  # longer lists of numbers are cut in the page (the raw JSON has them all)


def _table_html(value: object) -> str:
    """Nested data as nested tables, every number through :func:`human`."""
    e = html.escape
    if isinstance(value, dict):
        if not value:
            return "-"
        rows = "".join(f"<tr><th>{e(str(k))}</th><td>{_table_html(v)}</td></tr>"
                       for k, v in value.items())
        return f"<table class=kv>{rows}</table>"
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            cols = list(dict.fromkeys(k for v in value for k in v))
            head = "".join(f"<th>{e(str(c))}</th>" for c in cols)
            body = "".join("<tr>" + "".join(f"<td>{_table_html(v.get(c))}</td>" for c in cols)
                           + "</tr>" for v in value)
            return f"<table><tr>{head}</tr>{body}</table>"
        shown = ", ".join(e(human(v)) for v in value[:_MAX_LIST])
        more = f", ... ({len(value) - _MAX_LIST} more)" if len(value) > _MAX_LIST else ""
        return f"[{shown}{more}]"
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return value
    return e(human(value))


def _scope_html(result: AuditResult, data: dict[str, object]) -> str:
    """The opening table: what this report covers."""
    e = html.escape
    scope = data.get("scope")
    scope = scope if isinstance(scope, dict) else {}
    settings = data.get("settings")
    user = settings.get("user", "?") if isinstance(settings, dict) else "?"
    release = scope.get("release")
    devices = scope.get("devices")
    packets = scope.get("packets")
    gated = isinstance(data.get("release_gate"), dict)
    simulated = f"a simulated device trained on scenario user {e(str(user))}"
    if release is not None:
        release_text = e(str(release))
    elif gated:
        release_text = ("not named here: written by the release gate (<code>diredi cloud "
                        "merge</code>); the release's attestation records this report's SHA-256")
    else:
        release_text = "none: a standalone audit (<code>diredi audit run</code>), no release gated"
    if isinstance(devices, list):
        devices_text = e(", ".join(str(d) for d in devices)) + f" ({len(devices)})"
    else:
        devices_text = (f"not named here; the audit attacks {simulated}" if gated
                        else f"none enrolled: {simulated}")
    if isinstance(packets, int):
        packets_text = (f"{human(packets)} packet(s) merged into this release; the audit "
                        "attacks the configuration of the costliest one")
    else:
        packets_text = ("not counted here; the audit seals its own packets" if gated
                        else "none stored: the audit seals its own packets")
    rows = [
        ("Release", release_text),
        ("Devices", devices_text),
        ("Packets", packets_text),
        ("Claim audited", f"epsilon {e(human(result.claimed_epsilon))} at delta "
                          f"{e(human(result.delta))} (total per packet)"),
        ("Date", e(str(scope.get("created_at", "-")))),
        ("Software", e(str(scope.get("software_version", software_version())))),
        ("Report format", e(str(data.get("format")))),
    ]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<h2>What this report covers</h2><table class=kv id=scope>{body}</table>"


def _gate_html(data: dict[str, object]) -> str:
    gate = data.get("release_gate")
    if not isinstance(gate, dict):
        return ""
    forced = bool(gate.get("forced"))
    note = ("<p class=bad>Release FORCED despite the failing verdict.</p>" if forced else "")
    return f"<h2>Release gate</h2>{note}{_table_html(gate)}"


def report_bytes(data: dict[str, object]) -> bytes:
    """The exact bytes of ``audit.json`` (what the attestation's digest covers)."""
    return json.dumps(data, indent=2, sort_keys=True).encode()


def report_html(result: AuditResult, data: dict[str, object] | None = None) -> str:
    """One self-contained HTML page (no scripts, no external links)."""
    from . import metrics

    data = data if data is not None else report_json(result)
    e = html.escape
    roc_png = metrics.roc_loglog_png(
        [(f"{a.channel}/{a.attack}", a.roc) for a in result.attacks],
        title="Canary membership ROC (log-log)",
        epsilon=result.claimed_epsilon, delta=result.delta)
    nat_png = metrics.roc_loglog_png(list(result.natural_rocs),
                                     title="Natural membership ROC (user data vs held-out)")
    recon_png = _png_recon(result)
    mrows = "".join(
        f"<tr><td>{e(m.mechanism)}</td><td class={'ok' if m.verdict == 'pass' else 'bad'}>"
        f"{e(m.verdict)}</td><td>{e(human(m.claimed_epsilon))}</td><td>{m.eps_lower_bound:.3f}</td>"
        f"<td>{m.roc_epsilon:.3f}</td><td>{m.ceiling:.3f}</td><td>{e(rounded_text(m.detail))}</td></tr>"
        for m in result.mechanisms)
    rows = "".join(
        f"<tr><td>{e(n)}</td><td class={'ok' if ok else 'bad'}>{'pass' if ok else 'FAIL'}</td>"
        f"<td>{e(rounded_text(d))}</td></tr>" for n, ok, d in result.criteria)
    arows = "".join(
        f"<tr><td>{e(a.channel)}</td><td>{e(a.attack)}</td><td>{a.metrics.auc:.3f} "
        f"[{a.metrics.auc_interval[0]:.3f}, {a.metrics.auc_interval[1]:.3f}]</td>"
        f"<td>{a.metrics.tpr_at_1pct.rate:.3f} [{a.metrics.tpr_at_1pct.low:.3f}, "
        f"{a.metrics.tpr_at_1pct.high:.3f}]</td>"
        f"<td>{a.metrics.tpr_at_01pct.rate:.3f} [{a.metrics.tpr_at_01pct.low:.3f}, "
        f"{a.metrics.tpr_at_01pct.high:.3f}]</td>"
        f"<td>{a.canary_audit.epsilon_lower_bound:.3f} ({a.canary_audit.correct}/"
        f"{a.canary_audit.guesses})</td>"
        f"<td>{'' if a.metrics.consistency is None else f'{a.metrics.consistency.empirical_epsilon:.3f}'}</td></tr>"
        for a in result.attacks)
    raw = report_bytes(data).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DiReDi privacy audit</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:auto;font-size:14px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;font-size:12px}}
.ok{{color:#070}}.bad{{color:#b00;font-weight:bold}}pre{{background:#f6f6f6;font-size:11px;
overflow:auto}}table.kv th{{text-align:left;font-weight:normal;color:#444}}
details{{margin-top:2em}}</style></head><body>
<h1>Privacy audit: verdict <span class={'ok' if result.verdict == 'pass' else 'bad'}>
{e(result.verdict)}</span></h1>
{_scope_html(result, data)}
<p><code>{e(result.summary_line())}</code></p>
{_gate_html(data)}
<h2>Threat model</h2><p>{e(THREAT_MODEL)}</p>
<h2>Mechanisms</h2><p>Device implementation under attack: {e(result.config.implementation.value)}.
Each mechanism is tested against its own declared epsilon at delta {result.delta:g}. The ceiling is
the largest epsilon its attack could prove even if perfect; a claim at or above it is
<b>inconclusive</b>, never a pass.</p>
<table><tr><th>mechanism</th><th>verdict</th><th>claimed eps</th><th>one-run eps LB</th>
<th>ROC eps</th><th>ceiling</th><th>detail</th></tr>{mrows}</table>
<pre>{e(rounded_text(chr(10).join(result.text_lines())))}</pre>
<h2>Verdict criteria</h2><table><tr><th>criterion</th><th>result</th><th>detail</th></tr>
{rows}</table>
<p>Positive-control power: a leak is {'seen' if result.leak_detected else 'not seen'} (epsilon
lower bound above 0, or an AUC whose 95% interval lies above 0.5).</p>
<h2>DP settings declared by the packet</h2>{_table_html(data["dp_parameters"])}
<h2>DP-SGD noise floor</h2>{_table_html(data["noise_floor"])}
<h2>Accounting (privacy.account_packet)</h2>{_table_html(data["accounting"])}
<h2>Membership inference on canaries</h2>
<p>Intervals: AUC (Hanley-McNeil), TPR (Clopper-Pearson, {e(str(data["settings"]))[:0]}confidence
{result.settings['per_test_confidence']:.3f} per test after Bonferroni over
{result.settings['tests_bonferroni']} tests). Empirical epsilon: the smallest epsilon every ROC
point is consistent with at that confidence.</p>
<table><tr><th>channel</th><th>attack</th><th>AUC</th><th>TPR@1%FPR</th><th>TPR@0.1%FPR</th>
<th>one-run eps LB (correct/guesses)</th><th>ROC emp. eps</th></tr>{arows}</table>
{_img(roc_png, "log-log ROC")}
<h2>Epsilon lower bound vs claimed</h2>{_img(_png_eps(result), "epsilon lower bounds")}
<h2>Natural membership (user training data vs held-out)</h2>{_img(nat_png, "natural ROC")}
<h2>Reconstruction</h2>{_table_html(data["reconstruction"])}
{_img(recon_png, "reconstructions") if recon_png else "<p>no gradient inversion</p>"}
<h2>Packet inspection</h2>{_table_html(data["inspection"])}
<h2>Settings</h2>{_table_html(data["settings"])}
<details id=raw-json><summary>The raw report (audit.json, exact values; its SHA-256 is what the
release attestation records)</summary><pre>{e(raw)}</pre></details>
</body></html>
"""


def write_report(
    result: AuditResult, out_dir: Path, *, release_gate: Mapping[str, object] | None = None,
    scope: ReportScope | None = None,
) -> tuple[Path, Path, str]:
    """Write ``audit.json`` and ``audit.html`` into ``out_dir``; returns both paths and the
    SHA-256 (hex) of the JSON bytes (what a release attestation records). ``release_gate`` is
    written into the JSON (so the digest covers a forced release), and so is ``scope`` (default:
    a standalone audit written now: the clock is read here, at the edge that writes files).
    Raises :class:`LocalError` if the directory cannot be written."""
    scope = scope if scope is not None else ReportScope(created_at=datetime.now(UTC))
    data = report_json(result, release_gate=release_gate, scope=scope)
    raw = report_bytes(data)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        jp, hp = out_dir / "audit.json", out_dir / "audit.html"
        jp.write_bytes(raw)
        hp.write_text(report_html(result, data), encoding="utf-8")
    except OSError as exc:
        raise LocalError(f"cannot write the audit report to {out_dir}: {exc.strerror}") from exc
    return jp, hp, hashlib.sha256(raw).hexdigest()
