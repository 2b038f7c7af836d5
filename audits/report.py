"""The audit report: JSON (machine-readable, digest goes into the release attestation) and one
self-contained HTML page (plots embedded as base64 PNG, no external resource)."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diredi_secure.errors import LocalError

if TYPE_CHECKING:
    from .suite import AuditResult

__all__ = ["REPORT_FORMAT", "THREAT_MODEL", "report_html", "report_json", "write_report"]

REPORT_FORMAT = "diredi-audit-report/2"

THREAT_MODEL = (
    "Adversary: the cloud (or anyone holding a device's packets). It knows the shipped edge model, "
    "the public reference set, the RD algorithm and hyperparameters and, as differential privacy "
    "allows, every record of the user's data but the one in question (used for shadow runs). It "
    "sees the decoded payload of one packet. Unit of privacy: one training example of the user "
    "(add/remove one example, DP-SGD's neighbouring relation). The white-box channel attacks the "
    "DP-adapted model itself, which never leaves the device: an upper bound on any packet."
)


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
    result: AuditResult, *, release_gate: Mapping[str, object] | None = None
) -> dict[str, object]:
    """The report as JSON-ready data (non-finite floats as strings). ``release_gate``, when the
    release gate wrote the report, records its decision (profile, claimed epsilon, forced)."""
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


def _gate_html(data: dict[str, object]) -> str:
    gate = data.get("release_gate")
    if not isinstance(gate, dict):
        return ""
    forced = bool(gate.get("forced"))
    note = ("<p class=bad>Release FORCED despite the failing verdict.</p>" if forced else "")
    return (f"<h2>Release gate</h2>{note}<pre>"
            f"{html.escape(json.dumps(gate, indent=1, sort_keys=True))}</pre>")


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
        f"{e(m.verdict)}</td><td>{m.claimed_epsilon:.4g}</td><td>{m.eps_lower_bound:.3f}</td>"
        f"<td>{m.roc_epsilon:.3f}</td><td>{m.ceiling:.3f}</td><td>{e(m.detail)}</td></tr>"
        for m in result.mechanisms)
    rows = "".join(
        f"<tr><td>{e(n)}</td><td class={'ok' if ok else 'bad'}>{'pass' if ok else 'FAIL'}</td>"
        f"<td>{e(d)}</td></tr>" for n, ok, d in result.criteria)
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
    dp = json.dumps(data["dp_parameters"], indent=1)
    acct = json.dumps(data["accounting"], indent=1)
    rec = json.dumps(data["reconstruction"], indent=1)
    insp = json.dumps(data["inspection"], indent=1)
    settings = json.dumps(data["settings"], indent=1)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DiReDi privacy audit</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:auto;font-size:14px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;font-size:12px}}
.ok{{color:#070}}.bad{{color:#b00;font-weight:bold}}pre{{background:#f6f6f6;font-size:11px;
overflow:auto}}</style></head><body>
<h1>Privacy audit: verdict <span class={'ok' if result.verdict == 'pass' else 'bad'}>
{e(result.verdict)}</span></h1>
<p><code>{e(result.summary_line())}</code></p>
{_gate_html(data)}
<h2>Threat model</h2><p>{e(THREAT_MODEL)}</p>
<h2>Mechanisms</h2><p>Device implementation under attack: {e(result.config.implementation.value)}.
Each mechanism is tested against its own declared epsilon at delta {result.delta:g}. The ceiling is
the largest epsilon its attack could prove even if perfect; a claim at or above it is
<b>inconclusive</b>, never a pass.</p>
<table><tr><th>mechanism</th><th>verdict</th><th>claimed eps</th><th>one-run eps LB</th>
<th>ROC eps</th><th>ceiling</th><th>detail</th></tr>{mrows}</table>
<pre>{e(chr(10).join(result.text_lines()))}</pre>
<h2>Verdict criteria</h2><table><tr><th>criterion</th><th>result</th><th>detail</th></tr>
{rows}</table>
<p>Positive-control power: a leak is {'seen' if result.leak_detected else 'not seen'} (epsilon
lower bound above 0, or an AUC whose 95% interval lies above 0.5).</p>
<h2>DP settings declared by the packet</h2><pre>{e(dp)}</pre>
<h2>DP-SGD noise floor</h2><pre>{e(json.dumps(data["noise_floor"], indent=1))}</pre>
<h2>Accounting (privacy.account_packet)</h2><pre>{e(acct)}</pre>
<h2>Membership inference on canaries</h2>
<p>Intervals: AUC (Hanley-McNeil), TPR (Clopper-Pearson, {e(str(data["settings"]))[:0]}confidence
{result.settings['per_test_confidence']:.4f} per test after Bonferroni over
{result.settings['tests_bonferroni']} tests). Empirical epsilon: the smallest epsilon every ROC
point is consistent with at that confidence.</p>
<table><tr><th>channel</th><th>attack</th><th>AUC</th><th>TPR@1%FPR</th><th>TPR@0.1%FPR</th>
<th>one-run eps LB (correct/guesses)</th><th>ROC emp. eps</th></tr>{arows}</table>
{_img(roc_png, "log-log ROC")}
<h2>Epsilon lower bound vs claimed</h2>{_img(_png_eps(result), "epsilon lower bounds")}
<h2>Natural membership (user training data vs held-out)</h2>{_img(nat_png, "natural ROC")}
<h2>Reconstruction</h2><pre>{e(rec)}</pre>
{_img(recon_png, "reconstructions") if recon_png else "<p>no gradient inversion</p>"}
<h2>Packet inspection</h2><pre>{e(insp)}</pre>
<h2>Settings</h2><pre>{e(settings)}</pre>
</body></html>
"""


def write_report(
    result: AuditResult, out_dir: Path, *, release_gate: Mapping[str, object] | None = None
) -> tuple[Path, Path, str]:
    """Write ``audit.json`` and ``audit.html`` into ``out_dir``; returns both paths and the
    SHA-256 (hex) of the JSON bytes (what a release attestation records). ``release_gate`` is
    written into the JSON (so the digest covers a forced release).
    Raises :class:`LocalError` if the directory cannot be written."""
    data = report_json(result, release_gate=release_gate)
    raw = json.dumps(data, indent=2, sort_keys=True).encode()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        jp, hp = out_dir / "audit.json", out_dir / "audit.html"
        jp.write_bytes(raw)
        hp.write_text(report_html(result, data), encoding="utf-8")
    except OSError as exc:
        raise LocalError(f"cannot write the audit report to {out_dir}: {exc.strerror}") from exc
    return jp, hp, hashlib.sha256(raw).hexdigest()
