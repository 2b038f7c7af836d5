"""The accounting caches: noise searches on disk (re-checked on use), epsilons in memory, and the
vectorised curve against its per-order reference."""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diredi_secure import privacy
from diredi_secure.errors import ConfigError
from diredi_secure.privacy import (
    DEFAULT_DP_POLICY,
    Mechanism,
    MechanismKind,
    NoiseSearchCache,
    _accountant,
    _mechanisms,
    _noise_cache,
    default_noise_cache_path,
    search_noise,
)

POLICY = DEFAULT_DP_POLICY
# The default schedule's DP-SGD search (a target of 8, no noised entries).
SEARCH = dict(delta=POLICY.delta, sample_rate=POLICY.sample_rate, steps=POLICY.steps,
              lo=POLICY.bounds.min_noise_multiplier, hi=POLICY.bounds.max_noise_multiplier)
TARGET = 8.0


def _spent(sigma: float, extra: tuple[float, ...] = ()) -> float:
    return privacy.mechanisms_epsilon(
        [Mechanism(MechanismKind.DP_SGD, sigma, POLICY.sample_rate, POLICY.steps),
         *(Mechanism(MechanismKind.LABEL_HISTOGRAM, s) for s in extra)], POLICY.delta)


def _entries(path: Path) -> dict[str, float]:
    obj = json.loads(path.read_text())
    assert obj["format"] == "diredi-noise-search" and obj["version"] == 1
    entries: dict[str, float] = obj["entries"]
    return entries


def _rewrite(path: Path, factor: float) -> float:
    """Scale every stored answer by ``factor`` (an edited cache); return the first new value."""
    obj = json.loads(path.read_text())
    obj["entries"] = {k: v * factor for k, v in obj["entries"].items()}
    path.write_text(json.dumps(obj))
    os.chmod(path, 0o600)
    return float(next(iter(obj["entries"].values())))


@pytest.fixture
def process_cache(tmp_path: Path) -> Iterator[Path]:
    """This process's cache pointed at a temporary file, memory caches empty; restored after."""
    path = tmp_path / "process.json"
    previous = privacy.set_noise_search_cache(NoiseSearchCache(path))
    privacy.clear_accounting_caches()
    try:
        yield path
    finally:
        privacy.set_noise_search_cache(previous)
        privacy.clear_accounting_caches()


@pytest.fixture(scope="module")
def fresh_answer() -> float:
    return search_noise(TARGET, **SEARCH, cache=None)


# ------------------------------------------------------------------------------------------------
# On disk
# ------------------------------------------------------------------------------------------------
def test_a_search_is_stored_0600_and_read_back(tmp_path: Path, fresh_answer: float) -> None:
    path = tmp_path / "sub" / "noise.json"
    first = NoiseSearchCache(path)
    assert search_noise(TARGET, **SEARCH, cache=first) == fresh_answer
    assert (first.misses, first.hits, first.writes) == (1, 0, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert list(_entries(path).values()) == [fresh_answer]
    again = NoiseSearchCache(path)  # another process: nothing in memory
    assert search_noise(TARGET, **SEARCH, cache=again) == fresh_answer
    assert (again.hits, again.refused, again.writes) == (1, 0, 0)
    assert _spent(fresh_answer) <= TARGET


def test_the_key_is_the_full_parameter_set(tmp_path: Path) -> None:
    cache = NoiseSearchCache(tmp_path / "noise.json")
    a = search_noise(TARGET, **SEARCH, cache=cache)
    b = search_noise(TARGET, **{**SEARCH, "steps": POLICY.steps * 2}, cache=cache)
    c = search_noise(TARGET, **SEARCH, extra=(20.0,), cache=cache)
    d = search_noise(TARGET * (1 + 1e-12), **SEARCH, cache=cache)  # exact: float.hex
    assert cache.writes == 4 and len(_entries(tmp_path / "noise.json")) == 4
    assert b > a and c > a and d <= a


@pytest.mark.parametrize("factor", [0.9, 1 - 1e-6, 1.1, 1 + 1e-6],
                         ids=["less-noise", "a-hair-less", "more-noise", "a-hair-more"])
def test_an_edited_answer_is_refused_and_replaced(
    tmp_path: Path, fresh_answer: float, factor: float
) -> None:
    """Less noise than the search's would overspend the target; more would change every header
    and the model's utility. Either way the check fails, the search runs and is stored again."""
    path = tmp_path / "noise.json"
    search_noise(TARGET, **SEARCH, cache=NoiseSearchCache(path))
    edited = _rewrite(path, factor)
    if factor < 1:
        assert _spent(edited) > TARGET  # what the device would have spent
    cache = NoiseSearchCache(path)
    assert search_noise(TARGET, **SEARCH, cache=cache) == fresh_answer
    assert (cache.hits, cache.refused, cache.writes) == (1, 1, 1)
    assert list(_entries(path).values()) == [fresh_answer]


def test_an_edited_cache_never_makes_the_device_overspend(process_cache: Path) -> None:
    """Through the device's path (schedule_for, the process cache): the schedule, hence every
    header figure, is the one a cache-less device computes."""
    honest = privacy.schedule_for(TARGET, histogram=True, prototypes=True)
    _rewrite(process_cache, 0.5)
    privacy.clear_accounting_caches()
    got = privacy.schedule_for(TARGET, histogram=True, prototypes=True)
    assert got == honest
    assert got.total_epsilon <= TARGET * (1 + POLICY.epsilon_rel_tolerance)
    assert privacy.noise_search_cache().refused >= 1


@pytest.mark.parametrize("content", [b"not json", b'{"format": "other", "version": 1}',
                                     b'{"format": "diredi-noise-search", "version": 2, '
                                     b'"entries": {}}', b"\xff\xfe"])
def test_a_malformed_file_is_a_miss_and_is_replaced(
    tmp_path: Path, fresh_answer: float, content: bytes
) -> None:
    path = tmp_path / "noise.json"
    path.write_bytes(content)
    path.chmod(0o600)
    cache = NoiseSearchCache(path)
    assert search_noise(TARGET, **SEARCH, cache=cache) == fresh_answer
    assert (cache.misses, cache.writes) == (1, 1)
    assert list(_entries(path).values()) == [fresh_answer]


@pytest.mark.parametrize("entry", [-1.0, 0.0, "2.0", None, 1e400])
def test_malformed_entries_are_dropped(tmp_path: Path, entry: object) -> None:
    path = tmp_path / "noise.json"
    body = json.dumps({"format": "diredi-noise-search", "version": 1, "entries": {"k": entry}})
    path.write_text(body.replace("Infinity", "1e400"))
    path.chmod(0o600)
    assert NoiseSearchCache(path).get("k") is None


def test_a_file_others_may_write_or_an_oversized_one_is_ignored(
    tmp_path: Path, fresh_answer: float
) -> None:
    path = tmp_path / "noise.json"
    search_noise(TARGET, **SEARCH, cache=NoiseSearchCache(path))
    path.chmod(0o666)
    cache = NoiseSearchCache(path)
    assert search_noise(TARGET, **SEARCH, cache=cache) == fresh_answer
    assert (cache.hits, cache.misses, cache.writes) == (0, 1, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # rewritten private
    path.write_bytes(b" " * (_noise_cache.MAX_FILE_BYTES + 1))
    path.chmod(0o600)
    assert NoiseSearchCache(path).get("anything") is None


def test_a_planted_link_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    NoiseSearchCache(target).put("k", 2.0)
    link = tmp_path / "noise.json"
    link.symlink_to(target)
    assert NoiseSearchCache(link).get("k") is None


def test_a_planted_fifo_does_not_hang_the_search(tmp_path: Path, fresh_answer: float) -> None:
    path = tmp_path / "noise.json"
    os.mkfifo(path, 0o600)
    cache = NoiseSearchCache(path)
    assert search_noise(TARGET, **SEARCH, cache=cache) == fresh_answer
    assert cache.hits == 0


def test_entries_are_bounded_oldest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "noise.json"
    cache = NoiseSearchCache(path)
    # The real bound's worth of full-size keys fits under the file cap.
    key = _noise_cache.search_key(TARGET, extra=(1.0, 2.0), tolerance=1e-10, **SEARCH)
    body = {f"{key}#{i}": 1.0 + i for i in range(_noise_cache.MAX_ENTRIES)}
    size = len(json.dumps({"format": "diredi-noise-search", "version": 1, "entries": body}))
    assert size < _noise_cache.MAX_FILE_BYTES / 2
    monkeypatch.setattr(_noise_cache, "MAX_ENTRIES", 8)  # a small bound, to keep the test fast
    for i in range(13):
        cache.put(f"k{i}", 1.0 + i)
    entries = _entries(path)
    assert list(entries) == [f"k{i}" for i in range(5, 13)]
    cache.put("k6", 100.0)  # a rewritten key becomes the newest
    assert list(_entries(path))[-1] == "k6" and len(_entries(path)) == 8


def test_failed_searches_are_not_stored(tmp_path: Path) -> None:
    """A failure costs one or two curves, no more than checking a stored answer would."""
    path = tmp_path / "noise.json"
    cache = NoiseSearchCache(path)
    with pytest.raises(ConfigError):
        search_noise(1e6, **SEARCH, cache=cache)  # above what the least noise spends
    with pytest.raises(ConfigError):
        search_noise(1e-3, **SEARCH, extra=(POLICY.bounds.min_noise_multiplier,), cache=cache)
    with pytest.raises(ConfigError):
        search_noise(math.inf, **SEARCH, cache=cache)
    assert not path.exists() and cache.writes == 0


def test_a_disabled_cache_reads_and_writes_nothing(tmp_path: Path, fresh_answer: float) -> None:
    cache = NoiseSearchCache(None)
    assert not cache.enabled
    assert search_noise(TARGET, **SEARCH, cache=cache) == fresh_answer
    cache.put("k", 2.0)
    assert cache.get("k") is None and (cache.hits, cache.misses, cache.writes) == (0, 0, 0)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_skipped(tmp_path: Path, fresh_answer: float) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache's folder should be
    cache = NoiseSearchCache(blocker / "noise.json")
    assert search_noise(TARGET, **SEARCH, cache=cache) == fresh_answer
    assert cache.writes == 0


@pytest.mark.parametrize(("env", "want"), [
    ({"DIREDI_NOISE_CACHE": "off", "HOME": "/h"}, None),
    ({"DIREDI_NOISE_CACHE": "", "HOME": "/h"}, None),
    ({"DIREDI_NOISE_CACHE": "0"}, None),
    ({"DIREDI_NOISE_CACHE": "/x/n.json", "XDG_CACHE_HOME": "/c"}, "/x/n.json"),
    ({"XDG_CACHE_HOME": "/c", "HOME": "/h"}, "/c/diredi/noise-search.json"),
    ({"XDG_CACHE_HOME": "relative", "HOME": "/h"}, "/h/.cache/diredi/noise-search.json"),
    ({"HOME": "/h"}, "/h/.cache/diredi/noise-search.json"),
])
def test_where_the_cache_lives(env: dict[str, str], want: str | None) -> None:
    got = default_noise_cache_path(env)
    assert (None if got is None else str(got)) == want
    assert NoiseSearchCache.from_environment(env).enabled is (want is not None)


def test_noise_for_epsilon_goes_through_the_process_cache(
    process_cache: Path, fresh_answer: float
) -> None:
    got = privacy.noise_for_epsilon(TARGET, **SEARCH)
    assert got == fresh_answer and list(_entries(process_cache).values()) == [fresh_answer]
    privacy.clear_accounting_caches()
    assert privacy.noise_for_epsilon(TARGET, **SEARCH) == fresh_answer
    assert privacy.noise_search_cache().hits == 1


# ------------------------------------------------------------------------------------------------
# In memory
# ------------------------------------------------------------------------------------------------
def test_epsilons_are_cached_per_parameter_set_and_equal_the_uncached_figure() -> None:
    privacy.clear_accounting_caches()
    mechs = [Mechanism(MechanismKind.DP_SGD, 1.7, 1 / 3, 90),
             Mechanism(MechanismKind.LABEL_HISTOGRAM, 12.0)]
    want = privacy.epsilon_from_curve(privacy.compose(m.curve() for m in mechs), 1e-5)[0]
    assert privacy.mechanisms_epsilon(mechs, 1e-5) == want
    assert privacy.mechanisms_epsilon(tuple(mechs), 1e-5) == want
    info = _mechanisms._mechanisms_epsilon.cache_info()
    assert (info.hits, info.misses) == (1, 1) and info.maxsize is not None
    assert privacy.mechanisms_epsilon(mechs, 1e-6) > want  # delta is part of the key
    g = privacy.gaussian_epsilon(12.0, 1e-5)
    assert g == privacy.gaussian_epsilon(12, 1e-5)
    assert _mechanisms._gaussian_epsilon.cache_info().hits == 1
    assert g == privacy.epsilon_from_curve(privacy.gaussian_curve(12.0, 1.0, 1), 1e-5)[0]
    for cached in (_accountant._gaussian_curve, _mechanisms._gaussian_epsilon,
                   _mechanisms._mechanisms_epsilon):
        assert cached.cache_info().maxsize is not None  # bounded


def test_cached_curves_cannot_be_edited_by_a_caller() -> None:
    curve = privacy.gaussian_curve(2.0, 0.1, 10)
    with pytest.raises(ValueError):
        curve[0] = 0.0


@settings(max_examples=30, deadline=None)
@given(sigma=st.floats(0.3, 1e4), q=st.floats(1e-6, 0.999), steps=st.integers(1, 1_000_000),
       delta=st.sampled_from([1e-5, 1e-7, 1e-9]))
def test_the_vectorised_curve_gives_the_per_order_references_epsilon(
    sigma: float, q: float, steps: int, delta: float
) -> None:
    """Against the scipy per-order expansion (_log_a_int, the slow reference): epsilons agree
    well inside the 1e-9 tolerance a declaration is checked with."""
    reference = np.array([_accountant._log_a_int(q, sigma, a) / (a - 1)
                          for a in privacy.RDP_ORDERS]) * steps
    got = _accountant._compute_gaussian_curve(sigma, q, steps)
    want_eps = privacy.epsilon_from_curve(reference, delta)[0]
    got_eps = privacy.epsilon_from_curve(got, delta)[0]
    assert got_eps == pytest.approx(want_eps, rel=2e-10, abs=1e-12)
    # Per order: relative, except where log A is so small (~1e-16 per step) that neither
    # implementation keeps more than its absolute rounding error.
    assert np.allclose(got, reference, rtol=1e-9, atol=1e-14 * steps)
