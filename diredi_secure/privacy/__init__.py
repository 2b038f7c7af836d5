"""The one home for privacy: every epsilon in DiReDi-secure is computed here.

Torch-free (numpy, scipy; OpenDP for the discrete Gaussian, imported only when sampling):

* mechanisms with their sensitivities and parameter bounds (``Mechanism``, ``DPBounds``);
* the accountant: RDP of the Poisson-subsampled Gaussian, composed by adding curves;
* the data-independent RD schedule (``schedule_for``): wire parameters from policy + target only,
  its noise searches cached on disk between processes and re-checked on use (``NoiseSearchCache``);
* the device's noise source (``NoiseSource``): CSPRNG-seeded per run, discrete Gaussian for counts;
* packet accounting and the composed ledger (``account_packet``, ``charge``);
* the policy's DP limits (``DPPolicy``).

The device's RD, ingest, the store and the audits call this package; nothing else computes an
epsilon. See docs/PRIVACY.md for the statement these pieces add up to.
"""

from ._accountant import (
    ACCOUNTANT,
    RDP_ORDERS,
    compose,
    epsilon_from_curve,
    gaussian_curve,
    zero_curve,
)
from ._ledger import (
    NOISED_KINDS,
    POST_PROCESSING_KINDS,
    DPDeclaration,
    EntryDeclaration,
    NoiseSeeded,
    PacketCharge,
    UnaccountedRelease,
    account_packet,
    charge,
    curve_from_json,
    curve_to_json,
    lifetime_epsilon,
)
from ._mechanisms import (
    DPBounds,
    Mechanism,
    MechanismKind,
    ParameterOutOfBounds,
    check_mechanism,
    gaussian_epsilon,
    mechanisms_epsilon,
)
from ._noise import NoiseSource
from ._noise_cache import (
    NOISE_CACHE_ENV,
    NoiseSearchCache,
    default_noise_cache_path,
    noise_search_cache,
    set_noise_search_cache,
)
from ._policy import DEFAULT_DP_POLICY, DPPolicy
from ._schedule import (
    SEARCH_TOLERANCE,
    RDSchedule,
    clear_accounting_caches,
    noise_for_epsilon,
    schedule_for,
    search_noise,
)

__all__ = [
    "ACCOUNTANT",
    "DEFAULT_DP_POLICY",
    "NOISED_KINDS",
    "NOISE_CACHE_ENV",
    "POST_PROCESSING_KINDS",
    "RDP_ORDERS",
    "SEARCH_TOLERANCE",
    "DPBounds",
    "DPDeclaration",
    "DPPolicy",
    "EntryDeclaration",
    "Mechanism",
    "MechanismKind",
    "NoiseSearchCache",
    "NoiseSeeded",
    "NoiseSource",
    "PacketCharge",
    "ParameterOutOfBounds",
    "RDSchedule",
    "UnaccountedRelease",
    "account_packet",
    "charge",
    "check_mechanism",
    "clear_accounting_caches",
    "compose",
    "curve_from_json",
    "curve_to_json",
    "default_noise_cache_path",
    "epsilon_from_curve",
    "gaussian_curve",
    "gaussian_epsilon",
    "lifetime_epsilon",
    "mechanisms_epsilon",
    "noise_for_epsilon",
    "noise_search_cache",
    "schedule_for",
    "search_noise",
    "set_noise_search_cache",
    "zero_curve",
]
