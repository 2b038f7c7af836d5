"""Audit profiles: how much work one audit does. Kept apart from :mod:`.suite` (torch) so that
the CLI and the release gate can validate a profile name without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from diredi_secure.errors import ConfigError

__all__ = ["PROFILES", "AuditProfile"]


@dataclass(frozen=True)
class AuditProfile:
    """How much work one audit does. ``shadows`` is the number of offline LiRA shadow RD runs (and
    of the honest reference runs of the noise floor); ``trials`` the number of neighbouring-dataset
    runs of the histogram/prototype release. RD's own schedule (epochs, steps) is the device's,
    not the profile's."""

    name: str
    canaries: int
    shadows: int
    trials: int
    shipped_epochs: int
    surrogate_epochs: int
    reconstruction_iterations: int
    reconstruction_trials: int

    def __post_init__(self) -> None:
        if self.canaries < 2 or self.shadows < 2 or self.trials < 2:
            raise ConfigError(f"profile {self.name!r}: needs >= 2 canaries, trials and shadow runs "
                              "(offline LiRA estimates a variance)")
        if min(self.shipped_epochs, self.surrogate_epochs) < 1 or min(
                self.reconstruction_iterations, self.reconstruction_trials) < 0:
            raise ConfigError(f"profile {self.name!r}: epochs must be >= 1, reconstruction "
                              "iterations and trials >= 0")


PROFILES: dict[str, AuditProfile] = {
    # fast: what CI and the release gate run. Measured (seed 0, 1 torch thread, shared 2-core
    # machine under load ~7): 5-15 s per audit. 512 canaries instead of 256 raised the positive
    # control's one-run bound from 0.20 to 0.62 at no measurable cost; 8 shadows instead of 3 did
    # not change it (the bound is limited by m, not by LiRA's OUT estimate), so 4 are kept.
    "fast": AuditProfile("fast", canaries=512, shadows=4, trials=1000, shipped_epochs=10,
                         surrogate_epochs=60, reconstruction_iterations=60,
                         reconstruction_trials=1),
    "full": AuditProfile("full", canaries=1000, shadows=16, trials=4000, shipped_epochs=30,
                         surrogate_epochs=100, reconstruction_iterations=300,
                         reconstruction_trials=4),
}
