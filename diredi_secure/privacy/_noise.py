"""The device's noise source: every random draw that touches private data comes from here.

By default (:meth:`NoiseSource.secure`) each source is seeded from the OS CSPRNG (``secrets``) when
it is made, per RD run, and the seed is never stored or returned. :meth:`NoiseSource.seeded` exists
for research reproducibility only: packets made with it say so in their header
(``noise_seeded``) and the cloud's default policy refuses them.

Integer releases (the label histogram) use OpenDP's exact discrete Gaussian sampler, which draws
from the OS CSPRNG itself and has no floating-point noise. Float releases (prototypes, DP-SGD's
gradient noise) use numpy's PCG64 / torch's CPU generator seeded with 128 / 64 CSPRNG
bits: unpredictable, but still IEEE floats, with the residual risk docs/PRIVACY.md describes.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch stays off the cloud's import path
    import torch

__all__ = ["NoiseSource"]


class NoiseSource:
    """Generators for one RD run. Construct with :meth:`secure` (default) or :meth:`seeded`."""

    def __init__(self, *, _seed: int | None) -> None:
        self._seeded = _seed is not None
        entropy = _seed if _seed is not None else secrets.randbits(128)
        self._seq = np.random.SeedSequence(entropy)

    @classmethod
    def secure(cls) -> NoiseSource:
        return cls(_seed=None)

    @classmethod
    def seeded(cls, seed: int) -> NoiseSource:
        """Deterministic noise for research only: the packet records it and is refused by default."""
        if not isinstance(seed, int) or seed < 0:
            raise ValueError("a research seed is a non-negative integer")
        return cls(_seed=seed)

    @property
    def is_seeded(self) -> bool:
        return self._seeded

    def numpy(self) -> np.random.Generator:
        """A fresh, independent numpy generator."""
        return np.random.Generator(np.random.PCG64(self._seq.spawn(1)[0]))

    def torch_generator(self) -> torch.Generator:
        """A fresh torch CPU generator (64-bit seed: torch takes no more)."""
        import torch

        seed = int(self._seq.spawn(1)[0].generate_state(1, dtype=np.uint64)[0])
        return torch.Generator().manual_seed(seed)

    def discrete_gaussian(self, counts: np.ndarray, noise_multiplier: float) -> np.ndarray:
        """``counts`` (integers) plus discrete Gaussian noise of scale ``noise_multiplier``.

        Secure mode: OpenDP's exact sampler (``make_gaussian`` on an integer vector domain).
        Research mode: a seeded float Gaussian rounded to integers (not private; refused by
        policy), since OpenDP's sampler cannot be seeded."""
        ints = np.asarray(counts).astype(np.int64)
        if self._seeded:
            noise = np.rint(self.numpy().normal(0.0, noise_multiplier, size=ints.shape))
            return (ints + noise.astype(np.int64)).astype(np.float64)
        import opendp.prelude as dp

        dp.enable_features("contrib")
        meas = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=int)),
                                  dp.l2_distance(T=int), scale=float(noise_multiplier))
        return np.asarray(meas([int(v) for v in ints.ravel()]),
                          dtype=np.float64).reshape(ints.shape)
