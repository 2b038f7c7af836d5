"""An honest DP declaration for the transport benchmarks' synthetic packets (torch-free)."""

from __future__ import annotations

from diredi_secure.knowledge import DPParameters
from diredi_secure.privacy import ACCOUNTANT, DEFAULT_DP_POLICY, DPPolicy, schedule_for

__all__ = ["training_only_dp"]


def training_only_dp(epsilon: float, policy: DPPolicy = DEFAULT_DP_POLICY) -> DPParameters:
    """The header of a packet that sends only post-processing of a DP-SGD model (a weight delta)
    at total ``epsilon``: the policy's schedule, so ingest's recomputation accepts it."""
    s = schedule_for(float(epsilon), histogram=False, prototypes=False, policy=policy)
    return DPParameters(noise_multiplier=s.noise_multiplier, clip_norm=s.clip_norm,
                        sample_rate=s.sample_rate, steps=s.steps, accountant=ACCOUNTANT,
                        epsilon=s.training_epsilon, delta=s.delta, poisson_sampling=True,
                        total_epsilon=s.total_epsilon)
