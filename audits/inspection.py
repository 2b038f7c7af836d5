"""Packet inspection: the payload holds exactly what its header declares, noised entries carry
their declared noise, and no user sample (or a near copy of one) appears in it.

The auditor holds the user's private data (the audit scenario gives it), so it can check what no
cloud can: that a "noised" histogram or prototype set really differs from the exact statistic by
about the declared noise, and that no payload vector is a copy of a private input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from diredi_secure.errors import PayloadInvalid
from diredi_secure.knowledge import (
    KnowledgePayload,
    PayloadDescriptor,
    PayloadKind,
    decode_payload,
)
from diredi_secure.ml.data import NUM_CLASSES, Dataset

__all__ = ["NEAR_COPY_COSINE", "InspectionResult", "inspect_payload"]

#: Cosine similarity at or above which a payload vector counts as a copy of a private input (after
#: centring on the public reference mean), when it is also closer to that input than to any public
#: reference image.
NEAR_COPY_COSINE = 0.97
#: A noised entry whose residual against the exact statistic is below this fraction of the
#: declared noise standard deviation did not get its noise (chance of a false alarm: negligible).
NOISE_FLOOR_FRACTION = 0.2


@dataclass(frozen=True)
class InspectionResult:
    ok: bool
    findings: tuple[str, ...]
    entries: tuple[dict[str, object], ...] = field(default=())
    max_private_cosine: float = 0.0
    max_public_cosine: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "findings": list(self.findings), "entries": list(self.entries),
                "max_private_cosine": self.max_private_cosine,
                "max_public_cosine": self.max_public_cosine}


def _vectors_of(payload: KnowledgePayload, dim: int) -> list[tuple[str, np.ndarray]]:
    """Every ``dim``-long row the payload contains that could be an input (prototype rows, first
    layer weight rows inside a dense weight delta)."""
    out: list[tuple[str, np.ndarray]] = []
    for t in payload.tensors:
        v = t.values
        if t.kind == PayloadKind.DP_PROTOTYPES and v.ndim == 2 and v.shape[1] == dim:
            out.extend((f"{t.name}[{i}]", v[i]) for i in range(v.shape[0]))
        elif t.kind == PayloadKind.WEIGHT_DELTA and t.index is None and v.size >= dim:
            rows = v.reshape(-1)[: (v.size // dim) * dim].reshape(-1, dim)
            out.extend((f"{t.name}[{i * dim}:{(i + 1) * dim}]", rows[i])
                       for i in range(min(rows.shape[0], 256)))
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return an @ bn.T  # type: ignore[no-any-return]


def inspect_payload(
    payload: KnowledgePayload,
    descriptor: PayloadDescriptor,
    wire: bytes,
    *,
    private: Dataset,
    reference_x: np.ndarray,
    prototype_clip: float = 6.0,
) -> InspectionResult:
    """Inspect one decoded payload. Never raises for a finding (they are in the result)."""
    findings: list[str] = []
    entries: list[dict[str, object]] = []
    try:
        again = decode_payload(wire, descriptor)
    except PayloadInvalid as exc:
        findings.append(f"payload does not decode as its header declares: {exc.message}")
        again = payload
    declared = {e.name: e for e in descriptor.entries}
    present = {t.name for t in again.tensors}
    if set(declared) != present:
        findings.append(f"entries {sorted(present)} differ from declared {sorted(declared)}")
    n_ref = len(reference_x)
    counts = np.bincount(private.y, minlength=NUM_CLASSES).astype(np.float64)
    for t in again.tensors:
        info: dict[str, object] = {"name": t.name, "kind": t.kind.value, "dtype": t.dtype,
                                   "shape": list(t.values.shape),
                                   "noise_multiplier": t.noise_multiplier, "epsilon": t.epsilon}
        if t.kind == PayloadKind.REFERENCE_LOGITS:
            rows = t.values.shape[0]
            if t.values.ndim != 2 or t.values.shape[1] != NUM_CLASSES or rows > n_ref:
                findings.append(f"{t.name}: shape {t.values.shape} is not [<= {n_ref}, "
                                f"{NUM_CLASSES}]")
            if t.index is not None and t.index.size and int(t.index.max()) >= n_ref:
                findings.append(f"{t.name}: index points past the public reference set")
        elif t.kind in (PayloadKind.LABEL_HISTOGRAM, PayloadKind.DP_PROTOTYPES):
            if t.noise_multiplier <= 0.0 or t.epsilon <= 0.0:
                findings.append(f"{t.name}: a {t.kind.value} entry is computed from private data "
                                "directly and must carry its own noise and epsilon")
            if t.kind == PayloadKind.LABEL_HISTOGRAM and t.values.shape == (NUM_CLASSES,):
                resid = float(np.sqrt(np.mean((t.values - counts) ** 2)))
                expected = t.noise_multiplier
                info["residual_rms"], info["expected_noise_sd"] = resid, expected
                if expected > 0 and resid < NOISE_FLOOR_FRACTION * expected:
                    findings.append(f"{t.name}: differs from the exact histogram by RMS "
                                    f"{resid:.3g}, far below the declared noise sd {expected:.3g}")
            if t.kind == PayloadKind.DP_PROTOTYPES and t.values.ndim == 2:
                flat = private.x.reshape(len(private), -1).astype(np.float64)
                norms = np.linalg.norm(flat, axis=1, keepdims=True)
                flat = flat * np.minimum(1.0, prototype_clip / np.maximum(norms, 1e-12))
                present_c = counts > 0
                exact = np.zeros((NUM_CLASSES, flat.shape[1]))
                np.add.at(exact, private.y, flat)
                exact = np.clip(exact / np.maximum(counts, 1.0)[:, None], 0.0, 1.0)
                if t.values.shape == exact.shape and present_c.any():
                    resid = float(np.sqrt(np.mean((t.values[present_c] - exact[present_c]) ** 2)))
                    # noise sd on a class mean, capped by the [0, 1] clip range
                    sd = t.noise_multiplier * prototype_clip / np.maximum(counts[present_c], 1.0)
                    expected = float(np.mean(np.minimum(sd, 0.5)))
                    info["residual_rms"], info["expected_noise_sd"] = resid, expected
                    if t.noise_multiplier > 0 and resid < NOISE_FLOOR_FRACTION * expected:
                        findings.append(
                            f"{t.name}: within RMS {resid:.3g} of the exact private class means; "
                            f"the declared noise (sd about {expected:.3g}) is not there")
        entries.append(info)

    dim = int(np.prod(private.x.shape[1:]))
    vecs = _vectors_of(again, dim)
    max_priv = max_pub = 0.0
    if vecs and len(private):
        centre = reference_x.reshape(len(reference_x), -1).mean(axis=0)
        priv = private.x.reshape(len(private), -1) - centre
        pub = reference_x.reshape(len(reference_x), -1) - centre
        v = np.stack([x for _, x in vecs]).astype(np.float64)
        vc = np.where(np.all(v >= 0, axis=1, keepdims=True), v - centre, v)  # images get centred
        cp = _cosines(vc, priv)
        cq = _cosines(vc, pub)
        best_priv = cp.max(axis=1)
        best_pub = cq.max(axis=1)
        max_priv, max_pub = float(best_priv.max()), float(best_pub.max())
        for (name, _), bp, bq in zip(vecs, best_priv, best_pub, strict=True):
            if bp >= NEAR_COPY_COSINE and bp > bq:
                findings.append(f"{name} is a near copy of a private sample (cosine {bp:.3f}, "
                                f"best public match {bq:.3f})")
                if len(findings) > 20:
                    break
    return InspectionResult(ok=not findings, findings=tuple(findings), entries=tuple(entries),
                            max_private_cosine=max_priv if math.isfinite(max_priv) else 0.0,
                            max_public_cosine=max_pub if math.isfinite(max_pub) else 0.0)
