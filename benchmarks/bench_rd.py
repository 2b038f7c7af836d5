"""``diredi bench rd``: DP reverse distillation against plain training, and the noise search.

    diredi bench rd [--epochs 4] [--quick]

Measured in one child process (spawned: torch, one thread, an empty temporary noise-search cache
so the user's own cache is neither read nor written), on the digits scenario's first user and the
digits student (the device's default edge model):

* **per epoch**: the two training loops of ``reverse_distill`` and nothing around them
  (``_train_private``: Opacus DP-SGD; ``_train_plain``: SGD), same model, data and steps. Per
  epoch = (t(``epochs``) - t(1)) / (``epochs`` - 1), each t the minimum over repeats, so the one-off
  setup (Opacus's wrapping) is not spread over the epochs. DP-SGD is timed in every Opacus
  grad-sample mode (``hooks``, ``ew``, ``functorch``), and each mode's parameters after the same
  seeded run are compared with ``hooks``'s (equal results, to float rounding). Without
  ``--quick`` the MNIST student (depthwise-separable CNN, 28x28, 150 random examples) is timed
  too (1 against 3 epochs).
* **end to end**: ``reverse_distill`` with the default payload (weight delta, DP prototypes,
  histogram) at total epsilon 8 against epsilon ``inf`` (plain), the policy's 30 epochs
  (``--quick``: 2), every in-memory accounting cache emptied before each DP run as in a new
  process; once with the noise search answered by the on-disk cache (warm) and once with an empty
  one (cold: the full search).
* **noise search**: ``schedule_for`` for that payload (three searches), memory caches emptied, with
  an empty cache file (cold) and with the file the cold run wrote (warm: read and re-checked).

Wall-clock minima are the figures; the CPU time of the measuring thread is printed beside them
(the machines are shared). Ends with one line::

    rd: dp_per_epoch_x=X dp_end_to_end_x=Y noise_search_s=S grad_sample_mode=M

X is the default grad-sample mode's per-epoch ratio, Y the warm-cache end-to-end ratio, S the
warm-cache search seconds, M the digits student's default mode
(``diredi_secure.ml.reverse.default_grad_sample_mode``: ``ew`` without convolutions, ``functorch``
with them).
``measure_for_ceilings`` gives ``diredi bench ceilings`` the per-epoch ratio. Speed is reported,
never asserted.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModeFigures", "RDFigures", "measure", "measure_for_ceilings", "run"]

MODES = ("hooks", "ew", "functorch")


@dataclass(frozen=True)
class ModeFigures:
    """DP-SGD per epoch in one grad-sample mode, and how far its result is from ``hooks``'s."""

    model: str
    mode: str
    per_epoch_s: float
    per_epoch_cpu_s: float
    plain_per_epoch_s: float
    plain_per_epoch_cpu_s: float
    max_param_diff: float  # largest |parameter - hooks's| after the same seeded run
    is_default: bool  # default_grad_sample_mode's choice for this model

    @property
    def ratio(self) -> float:
        return self.per_epoch_s / self.plain_per_epoch_s

    @property
    def cpu_ratio(self) -> float:
        return self.per_epoch_cpu_s / self.plain_per_epoch_cpu_s


@dataclass(frozen=True)
class RDFigures:
    epochs: int
    default_mode: str
    modes: tuple[ModeFigures, ...]
    e2e_epochs: int
    plain_rd_s: float
    dp_rd_s: float  # warm on-disk noise cache
    dp_rd_cold_s: float  # empty cache: the search runs
    search_cold_s: float
    search_warm_s: float

    def mode(self, mode: str, model: str = "digits") -> ModeFigures:
        return next(m for m in self.modes if m.mode == mode and m.model == model)

    @property
    def dp_per_epoch_x(self) -> float:
        return self.mode(self.default_mode).ratio

    @property
    def dp_end_to_end_x(self) -> float:
        return self.dp_rd_s / self.plain_rd_s

    @property
    def dp_end_to_end_cold_x(self) -> float:
        return self.dp_rd_cold_s / self.plain_rd_s


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of ``fn()``."""
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w, time.thread_time() - c


def _per_epoch_figures(
    model_name: str, spec: Any, data: Any, lo: int, hi: int, repeats: int,
    modes: tuple[str, ...] = MODES,
) -> list[ModeFigures]:
    import copy

    import torch

    from diredi_secure.ml.models import build_model
    from diredi_secure.ml.reverse import (
        RDConfig,
        _train_plain,
        _train_private,
        default_grad_sample_mode,
    )
    from diredi_secure.privacy import NoiseSource

    shipped = build_model(spec, seed=0).eval()
    for p in shipped.parameters():
        p.requires_grad_(False)  # the pull term's frozen targets, as reverse_distill sets them
    default = default_grad_sample_mode(shipped)
    modes = tuple(default if m == "default" else m for m in modes)

    def fresh() -> torch.nn.Module:
        model = copy.deepcopy(shipped).train()
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def private(mode: str, n: int, seed: int | None = None) -> torch.nn.Module:
        config = RDConfig(epsilon=8.0, epochs=n)
        nm = config.schedule().noise_multiplier
        noise = NoiseSource.secure() if seed is None else NoiseSource.seeded(seed)
        return _train_private(fresh(), shipped, data, config, noise_multiplier=nm, lr=0.05,
                              noise=noise, grad_sample_mode=mode)

    def plain(n: int) -> None:
        _train_plain(fresh(), shipped, data, RDConfig(epsilon=8.0, epochs=n), lr=0.05,
                     gen=torch.Generator().manual_seed(0))

    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    variants: list[tuple[str, Callable[[int], Any]]] = [("plain", plain)]
    variants += [(m, functools.partial(private, m)) for m in modes]
    for n in (lo, hi):  # the schedules' noise searches are not part of an epoch
        RDConfig(epsilon=8.0, epochs=n).schedule()
    for _, fn in variants:  # warm-up: imports, first-call allocations
        fn(lo)
    for _ in range(repeats):  # interleaved, so a burst of load on the machine hits every variant
        for name, fn in variants:
            for n in (lo, hi):
                runs.setdefault((name, n), []).append(_timed(functools.partial(fn, n)))

    def per_epoch(name: str, k: int) -> float:
        t_hi = min(r[k] for r in runs[(name, hi)])
        t_lo = min(r[k] for r in runs[(name, lo)])
        return max(t_hi - t_lo, 1e-9) / (hi - lo)

    def flat(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    reference = flat(private("hooks", 2, seed=7)) if "hooks" in modes else None
    out = []
    for mode in modes:
        diff = (float("nan") if reference is None
                else float((flat(private(mode, 2, seed=7)) - reference).abs().max()))
        out.append(ModeFigures(model_name, mode, per_epoch(mode, 0), per_epoch(mode, 1),
                               per_epoch("plain", 0), per_epoch("plain", 1), diff,
                               mode == default))
    return out


def _measure_child(epochs: int, quick: bool, per_epoch_only: bool, cache_dir: str) -> RDFigures:
    """The measurement itself (imports torch: runs in a spawned child)."""
    import numpy as np
    import torch

    from diredi_secure.ml import make_scenario
    from diredi_secure.ml.data import Dataset, ScenarioConfig
    from diredi_secure.ml.models import build_model, mnist_specs, student_spec
    from diredi_secure.ml.reverse import DEFAULT_PAYLOAD_KINDS, RDConfig, reverse_distill
    from diredi_secure.privacy import (
        NoiseSearchCache,
        clear_accounting_caches,
        set_noise_search_cache,
    )

    torch.set_num_threads(1)
    files = iter(range(1_000_000))

    def fresh_cache() -> None:
        set_noise_search_cache(NoiseSearchCache(Path(cache_dir) / f"cold-{next(files)}.json"))

    warm_file = Path(cache_dir) / "warm.json"
    set_noise_search_cache(NoiseSearchCache(warm_file))
    scenario = make_scenario(0)
    user = scenario.users[0].train
    repeats = 2 if quick else 11  # an epoch is 3 steps, milliseconds: minima need many tries
    modes = _per_epoch_figures("digits", student_spec(), user, 1, max(epochs, 2), repeats,
                               ("default",) if per_epoch_only else MODES)
    default_mode = next(m.mode for m in modes if m.is_default)
    if not quick and not per_epoch_only:
        rng = np.random.default_rng(0)
        n = ScenarioConfig().user_train_size  # a user's examples, as in the scenario (150)
        mnist = Dataset(rng.random((n, 1, 28, 28)).astype(np.float32),
                        rng.integers(0, 10, n).astype(np.int64))
        modes += _per_epoch_figures("mnist", mnist_specs()[1], mnist, 1, 3, 2)
    nan = float("nan")
    if per_epoch_only:
        return RDFigures(epochs=epochs, default_mode=default_mode, modes=tuple(modes),
                         e2e_epochs=0, plain_rd_s=nan, dp_rd_s=nan, dp_rd_cold_s=nan,
                         search_cold_s=nan, search_warm_s=nan)

    e2e_epochs = 2 if quick else RDConfig().policy.epochs
    shipped = build_model(student_spec(), seed=0).eval()
    dp = RDConfig(epsilon=8.0, epochs=e2e_epochs, kinds=DEFAULT_PAYLOAD_KINDS)
    plain = RDConfig(epsilon=float("inf"), epochs=e2e_epochs, kinds=DEFAULT_PAYLOAD_KINDS)

    def rd(config: RDConfig) -> None:
        reverse_distill(shipped, user, scenario.reference_x, config)

    set_noise_search_cache(NoiseSearchCache(warm_file))
    rd(dp)  # warm-up (OpenDP's import, first allocations); fills the warm cache file
    rd(plain)
    e2e_repeats = 1 if quick else 3
    plain_s = min(_timed(lambda: rd(plain))[0] for _ in range(e2e_repeats))
    warm, cold = [], []
    for _ in range(e2e_repeats):
        clear_accounting_caches()
        set_noise_search_cache(NoiseSearchCache(warm_file))
        warm.append(_timed(lambda: rd(dp))[0])
        clear_accounting_caches()
        fresh_cache()
        cold.append(_timed(lambda: rd(dp))[0])

    search_file = Path(cache_dir) / "search.json"
    clear_accounting_caches()
    set_noise_search_cache(NoiseSearchCache(search_file))
    search_cold = _timed(dp.schedule)[0]  # schedule_for: the histogram's, prototypes', DP-SGD's
    clear_accounting_caches()
    set_noise_search_cache(NoiseSearchCache(search_file))
    search_warm = _timed(dp.schedule)[0]
    return RDFigures(
        epochs=epochs, default_mode=default_mode, modes=tuple(modes), e2e_epochs=e2e_epochs,
        plain_rd_s=plain_s, dp_rd_s=min(warm), dp_rd_cold_s=min(cold),
        search_cold_s=search_cold, search_warm_s=search_warm,
    )


def measure(epochs: int, *, quick: bool, per_epoch_only: bool = False) -> RDFigures:
    """Run the measurement in a spawned child (torch stays out of this process)."""
    if epochs < 2:
        raise ValueError(f"epochs must be >= 2 (per epoch = t(N) - t(1)), got {epochs}")
    with tempfile.TemporaryDirectory(prefix="bench-rd-") as tmp, \
            mp.get_context("spawn").Pool(1) as pool:
        fig: RDFigures = pool.apply(_measure_child, (epochs, quick, per_epoch_only, tmp))
    return fig


def measure_for_ceilings(*, epochs: tuple[int, int]) -> Mapping[str, float]:
    """The per-epoch figure ``diredi bench ceilings`` reads (``dp_overhead``: the default mode's
    DP seconds per epoch over plain's, per epoch = difference of an ``epochs[1]``-epoch and a
    1-epoch run; ``epochs[0]`` must be 1). Only the default mode is timed."""
    low, high = epochs
    if low != 1:
        raise ValueError("bench_rd measures per epoch against a 1-epoch run")
    fig = measure(high, quick=high <= 3, per_epoch_only=True)
    got = fig.mode(fig.default_mode)
    return {"dp_overhead": got.ratio, "dp_overhead_cpu": got.cpu_ratio,
            "dp_per_epoch_s": got.per_epoch_s, "plain_per_epoch_s": got.plain_per_epoch_s}


def run(epochs: int, quick: bool, out: Callable[[str], None] = print) -> RDFigures:
    fig = measure(epochs, quick=quick)
    out(f"per epoch (t({max(epochs, 2)}) - t(1); mnist: t(3) - t(1)), DP-SGD against plain SGD:")
    for m in fig.modes:
        mark = "  <- default" if m.is_default else ""
        out(f"  {m.model:6s} {m.mode:9s} {m.per_epoch_s * 1e3:9.2f} ms  x{m.ratio:5.2f} "
            f"(cpu x{m.cpu_ratio:5.2f}; plain {m.plain_per_epoch_s * 1e3:.2f} ms)  "
            f"max |param - hooks| {m.max_param_diff:.1e}{mark}")
    for model in dict.fromkeys(m.model for m in fig.modes):
        fastest = min((m for m in fig.modes if m.model == model),
                      key=lambda m: m.per_epoch_cpu_s)
        if not fastest.is_default:
            out(f"  note: {fastest.mode} took the least CPU on the {model} student in this run")
    out(f"end to end (reverse_distill, {fig.e2e_epochs} epochs, default payload, epsilon 8 vs inf):"
        f" plain {fig.plain_rd_s:.3f} s, DP {fig.dp_rd_s:.3f} s (x{fig.dp_end_to_end_x:.2f}) with"
        f" the noise cache warm, {fig.dp_rd_cold_s:.3f} s (x{fig.dp_end_to_end_cold_x:.2f}) cold")
    out(f"noise search (schedule_for, 3 searches): cold {fig.search_cold_s:.3f} s, "
        f"warm cache {fig.search_warm_s:.3f} s "
        f"({fig.search_cold_s / max(fig.search_warm_s, 1e-9):.0f}x)")
    out(f"rd: dp_per_epoch_x={fig.dp_per_epoch_x:.2f} dp_end_to_end_x={fig.dp_end_to_end_x:.2f} "
        f"noise_search_s={fig.search_warm_s:.3f} grad_sample_mode={fig.default_mode}")
    return fig


if __name__ == "__main__":  # pragma: no cover
    run(4, quick=False)
