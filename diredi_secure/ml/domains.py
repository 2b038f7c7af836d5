"""User domains that are not convolutions: a rotation, a stroke thickness, a gamma curve, noise.

A user's device sees the world through its own sensor and handwriting. The digits scenario's
shifted user is a convolution by construction (a shift plus a blur, ``data.apply_domain_shift``);
these families are not, so a method that models a user's domain as a kernel cannot fit them
exactly. Each is named by a short string ``family:parameter`` (kept in ``UserSpec.domain`` and in
a scenario's JSON):

* ``rotation:DEG`` -- rotate by ``DEG`` degrees counter-clockwise about the centre (bilinear,
  zero fill): geometric.
* ``thickness:K`` -- grey dilation with a ``K x K`` footprint (``K`` in 2..5): thicker strokes,
  morphological.
* ``gamma:G`` -- every pixel ``x ** G`` (``G`` in (0, 10]): photometric, per pixel.
* ``salt_pepper:P`` -- a share ``P`` in (0, 0.5] of the pixels, half set to 1 and half to 0,
  drawn from the generator the caller passes: noise.

Every function maps ``[N, 1, H, W]`` float32 in [0, 1] to the same shape and range, and is
deterministic given its generator. Parameters are fixed per scenario before any tuning
(docs/METHOD.md, "The MNIST scenario"). Raises :class:`~diredi_secure.errors.DatasetError` for an
unknown family or a parameter out of range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DatasetError

__all__ = ["DOMAIN_FAMILIES", "Domain", "apply_domain", "parse_domain"]

DOMAIN_FAMILIES: tuple[str, ...] = ("rotation", "thickness", "gamma", "salt_pepper")
_MAX_DOMAIN_TEXT = 64


@dataclass(frozen=True)
class Domain:
    """A parsed domain: its family and its one parameter (bounds checked here)."""

    family: str
    parameter: float

    def __post_init__(self) -> None:
        f, p = self.family, float(self.parameter)
        if f not in DOMAIN_FAMILIES:
            raise DatasetError(f"unknown domain family {f!r}; known: {list(DOMAIN_FAMILIES)}")
        if not np.isfinite(p):
            raise DatasetError(f"domain {f} needs a finite parameter, got {p}")
        ok = {
            "rotation": -180.0 <= p <= 180.0,
            "thickness": p == int(p) and 2 <= p <= 5,
            "gamma": 0.0 < p <= 10.0,
            "salt_pepper": 0.0 < p <= 0.5,
        }[f]
        if not ok:
            raise DatasetError(f"domain {f}:{p:g} has its parameter out of range")

    @property
    def text(self) -> str:
        return f"{self.family}:{self.parameter:g}"


def parse_domain(text: str) -> Domain:
    """``"family:parameter"`` -> :class:`Domain`; raises :class:`DatasetError`."""
    if not isinstance(text, str) or len(text) > _MAX_DOMAIN_TEXT or text.count(":") != 1:
        raise DatasetError(f"a domain is 'family:parameter', got {str(text)[:_MAX_DOMAIN_TEXT]!r}")
    family, _, raw = text.partition(":")
    try:
        value = float(raw)
    except ValueError as exc:
        raise DatasetError(f"domain {text!r}: {raw!r} is not a number") from exc
    return Domain(family, value)


def apply_domain(x: np.ndarray, domain: str | Domain, rng: np.random.Generator) -> np.ndarray:
    """Images ``x`` (``[N, 1, H, W]``, [0, 1]) through ``domain``; ``rng`` is used by the noise
    family only (the others ignore it). Returns float32 in [0, 1], same shape."""
    from scipy import ndimage

    d = parse_domain(domain) if isinstance(domain, str) else domain
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 1:
        raise DatasetError(f"images must have shape [N, 1, H, W], got {list(x.shape)}")
    if d.family == "rotation":
        out = ndimage.rotate(x, d.parameter, axes=(3, 2), reshape=False, order=1,
                             mode="constant", cval=0.0)
    elif d.family == "thickness":
        k = int(d.parameter)
        out = ndimage.grey_dilation(x, size=(1, 1, k, k))
    elif d.family == "gamma":
        out = np.power(x, np.float32(d.parameter))
    else:  # salt_pepper
        hit = rng.random(x.shape) < d.parameter
        salt = rng.random(x.shape) < 0.5
        out = np.where(hit, salt.astype(np.float32), x)
    result: np.ndarray = np.clip(out, 0.0, 1.0).astype(np.float32)
    return result
