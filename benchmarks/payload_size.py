"""Payload size against accuracy: which compact knowledge payload keeps DiReDi's accuracy?

``python -m diredi_secure.benchmarks.payload_size [--seeds 0 1] [--epsilon 8] [--scenario mnist]``
runs, per seed,
the loop's KD once and one DP RD per user (the loop's default RD config), then for every payload
variant in :data:`VARIANTS`: extracts that payload from the *same* adapted models (same noise
draws for the histogram and prototypes, so variants are paired), encodes it to the wire bytes,
**decodes it again** (the cloud sees the dequantised int8 / float16 values, which
:func:`~diredi_secure.ml.run_loop` skips: it merges the float32 payload), merges, and re-distils a
per-user model for each user exactly as ``run_loop`` does. It prints user-test accuracy,
presumed-test accuracy, payload bytes per device and their ratio U to FedAvg's float32 weight delta
measured in the same run (``baselines.fedavg_upload_bytes``).

Privacy: every variant sends the prototypes, so every variant runs the same schedule and spends the
same total epsilon (DP-SGD + histogram + prototypes, checked); the reference logits and the weight
delta are post-processing of the DP model, free.

``prototype_dtype`` is applied to the extracted ``dp_prototypes`` entry here: ``RDConfig`` has no
such field yet (``extract_payload`` always sends them as float16).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from diredi_secure.errors import ConfigError
from diredi_secure.knowledge import (
    KnowledgePayload,
    PayloadKind,
    WireDType,
    decode_payload,
    encode_payload,
)
from diredi_secure.ml import (
    DeviceKnowledge,
    LoopConfig,
    RDConfig,
    build_model,
    distill_student,
    make_scenario,
    merge_into_teacher,
    rekd_student,
    reverse_distill,
    train_classifier,
)
from diredi_secure.ml.data import ScenarioConfig
from diredi_secure.ml.evaluate import accuracy
from diredi_secure.ml.models import specs_for
from diredi_secure.ml.reverse import dp_parameters_for, extract_payload
from diredi_secure.privacy import NoiseSource

from .baselines import fedavg_upload_bytes

__all__ = ["MNIST_VARIANTS", "VARIANTS", "PayloadVariant", "VariantRun", "main", "run_seed",
           "summarise"]

_L = PayloadKind.REFERENCE_LOGITS
_D = PayloadKind.WEIGHT_DELTA
_P = PayloadKind.DP_PROTOTYPES  # also sends the noised label histogram (its denominator)


@dataclass(frozen=True)
class PayloadVariant:
    """A payload to try: the RDConfig payload fields, plus the prototypes' wire dtype."""

    name: str
    kinds: tuple[PayloadKind, ...]
    top_m: int | None = None
    logits_dtype: WireDType = "float16"
    top_k: int | None = None
    delta_dtype: WireDType = "float16"
    prototype_dtype: WireDType = "float16"
    # Simulated narrower codes (the wire has int8 at most): an int8 entry's values are requantised
    # to ``bits`` (symmetric, same peak) after decoding, and its bytes counted as packed
    # ``ceil(n * bits / 8)``. 8: the real int8 encoding.
    delta_bits: int = 8
    prototype_bits: int = 8
    # Which draw of the histogram / prototype noise (the same for every variant: paired). Other
    # draws measure how much that DP noise alone moves the figures (``--draws``).
    noise_draw: int = 1

    @property
    def simulated(self) -> bool:
        return self.delta_bits < 8 or self.prototype_bits < 8

    def rd_config(self, base: RDConfig) -> RDConfig:
        return replace(base, kinds=self.kinds, top_m=self.top_m, logits_dtype=self.logits_dtype,
                       top_k=self.top_k, delta_dtype=self.delta_dtype)


VARIANTS: tuple[PayloadVariant, ...] = (
    PayloadVariant("full (default)", (_L, _D, _P)),
    PayloadVariant("delta16+proto16", (_D, _P)),
    PayloadVariant("delta8+proto8", (_D, _P), delta_dtype="int8", prototype_dtype="int8"),
    PayloadVariant("delta8 k512+proto8", (_D, _P), top_k=512, delta_dtype="int8",
                   prototype_dtype="int8"),
    PayloadVariant("delta8 k128+proto8", (_D, _P), top_k=128, delta_dtype="int8",
                   prototype_dtype="int8"),
    PayloadVariant("logits8 m128+proto8", (_L, _P), top_m=128, logits_dtype="int8",
                   prototype_dtype="int8"),
    PayloadVariant("logits8 m64+proto8", (_L, _P), top_m=64, logits_dtype="int8",
                   prototype_dtype="int8"),
    PayloadVariant("logits8 m32+proto8", (_L, _P), top_m=32, logits_dtype="int8",
                   prototype_dtype="int8"),
    PayloadVariant("logits8 m64+proto16", (_L, _P), top_m=64, logits_dtype="int8"),
    PayloadVariant("proto8 only", (_P,), prototype_dtype="int8"),
    PayloadVariant("delta8+proto4*", (_D, _P), delta_dtype="int8", prototype_dtype="int8",
                   prototype_bits=4),
    PayloadVariant("delta6+proto4*", (_D, _P), delta_dtype="int8", prototype_dtype="int8",
                   delta_bits=6, prototype_bits=4),
    PayloadVariant("delta5+proto4*", (_D, _P), delta_dtype="int8", prototype_dtype="int8",
                   delta_bits=5, prototype_bits=4),
    PayloadVariant("delta4+proto4*", (_D, _P), delta_dtype="int8", prototype_dtype="int8",
                   delta_bits=4, prototype_bits=4),
    PayloadVariant("delta4+proto8*", (_D, _P), delta_dtype="int8", prototype_dtype="int8",
                   delta_bits=4),
)


# At the MNIST scenario's edge-model size (86,026 weights, issue 17 item 3): the 4-bit default,
# top-k deltas (one round, so no error feedback to carry), reference-set logits and prototypes
# alone, all with the 4-bit prototypes and the histogram (every variant spends the same total).
MNIST_VARIANTS: tuple[PayloadVariant, ...] = (
    PayloadVariant("delta4+proto4 (default)", (_D, _P), delta_dtype="int4",
                   prototype_dtype="int4"),
    PayloadVariant("delta4 k8192+proto4", (_D, _P), top_k=8192, delta_dtype="int4",
                   prototype_dtype="int4"),
    PayloadVariant("delta4 k2048+proto4", (_D, _P), top_k=2048, delta_dtype="int4",
                   prototype_dtype="int4"),
    PayloadVariant("delta4 k512+proto4", (_D, _P), top_k=512, delta_dtype="int4",
                   prototype_dtype="int4"),
    PayloadVariant("logits8 m500+proto4", (_L, _P), logits_dtype="int8", prototype_dtype="int4"),
    PayloadVariant("logits8 m128+proto4", (_L, _P), top_m=128, logits_dtype="int8",
                   prototype_dtype="int4"),
    PayloadVariant("proto4 only", (_P,), prototype_dtype="int4"),
)


@dataclass(frozen=True)
class VariantRun:
    variant: str
    seed: int
    draw: int
    user_acc: dict[str, float]
    presumed_acc: float   # mean over the users' models on the presumed test set
    payload_bytes: float  # mean over devices (packed estimate for simulated bit widths)
    deflated_bytes: float  # the same payload through zlib level 9 (not on the wire today)
    fedavg_bytes: float   # FedAvg's float32 delta, same adapted models
    epsilon_spent: float  # mean over devices, composed
    seconds: float

    @property
    def user_mean(self) -> float:
        return float(np.mean(list(self.user_acc.values())))

    @property
    def upload_ratio(self) -> float:
        return self.payload_bytes / self.fedavg_bytes


def _with_prototype_dtype(payload: KnowledgePayload, dtype: WireDType) -> KnowledgePayload:
    return KnowledgePayload(tuple(replace(t, dtype=dtype) if t.kind == _P else t
                                  for t in payload.tensors))


def _requantise(payload: KnowledgePayload, bits: dict[PayloadKind, int]) -> tuple[
        KnowledgePayload, int]:
    """``payload`` (decoded) with int8 entries of ``bits`` kinds on a coarser symmetric grid of
    the same peak, and the bytes that packing them at that width would save."""
    out, saved = [], 0
    for t in payload.tensors:
        b = bits.get(t.kind, 8)
        if t.dtype != "int8" or b >= 8:
            out.append(t)
            continue
        levels = 2 ** (b - 1) - 1
        peak = float(np.max(np.abs(t.values))) if t.values.size else 0.0
        step = peak / levels if peak > 0 else 1.0
        q = np.clip(np.rint(t.values / step), -levels, levels) * step
        out.append(replace(t, values=q.astype(np.float32)))
        saved += t.values.size - math.ceil(t.values.size * b / 8)
    return KnowledgePayload(tuple(out)), saved


def _research_seed(seed: int, user: int, role: int) -> int:
    """Repeatable research noise per (seed, user, draw); such packets are marked noise_seeded."""
    state = np.random.SeedSequence([seed, user, role]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def run_seed(seed: int, epsilon: float, variants: Sequence[PayloadVariant],
             loop: LoopConfig | None = None,
             scenario_config: ScenarioConfig | None = None) -> list[VariantRun]:
    """KD and RD once for ``seed``, then every variant's payload -> bytes -> merge -> re-KD.
    ``scenario_config`` (default: the digits) also picks the models (``specs_for``)."""
    loop = loop or LoopConfig()
    base = replace(loop.rd, epsilon=epsilon)
    scenario = make_scenario(seed, scenario_config)
    teacher_spec, student_spec = specs_for(scenario.config.dataset)
    users = scenario.users
    teacher = build_model(teacher_spec, seed=seed)
    train_classifier(teacher, scenario.presumed_train, loop.teacher, seed=seed)
    shipped = build_model(student_spec, seed=seed + 1)
    distill_student(shipped, teacher, scenario.presumed_train, scenario.reference_x, loop.kd,
                    seed=seed)
    rds = [reverse_distill(shipped, u.train, scenario.reference_x,
                           replace(base, research_seed=_research_seed(seed, i, 0)))
           for i, u in enumerate(users)]
    fedavg = float(np.mean([fedavg_upload_bytes(r.adapted, shipped) for r in rds]))
    runs = []
    for v in variants:
        t0 = time.perf_counter()
        cfg = v.rd_config(base)
        devices, sizes, spent, deflated = [], [], [], []
        for i, (u, r) in enumerate(zip(users, rds, strict=True)):
            payload = extract_payload(r.adapted, shipped, u.train, scenario.reference_x, cfg,
                                      schedule=cfg.schedule() if cfg.private else None,
                                      noise=NoiseSource.seeded(
                                          _research_seed(seed, i, 1 + v.noise_draw)))
            payload = _with_prototype_dtype(payload, v.prototype_dtype)
            data, descriptor = encode_payload(payload)
            decoded, saved = _requantise(decode_payload(data, descriptor),
                                         {_D: v.delta_bits, _P: v.prototype_bits})
            devices.append(DeviceKnowledge(u.name, decoded))
            sizes.append(len(data) - saved)
            # Entropy-coded size: the (requantised) codes re-encoded, then zlib level 9.
            deflated.append(len(zlib.compress(encode_payload(decoded)[0], 9)))
            # Every variant sends the prototypes: the same schedule as the RD run, same total.
            total = (dp_parameters_for(cfg, seeded=True).total_epsilon if cfg.private
                     else math.inf)
            if cfg.private and abs(total - r.dp.total_epsilon) > 1e-6 * r.dp.total_epsilon:
                raise ConfigError(f"variant {v.name} spends {total}, the RD run "
                                  f"{r.dp.total_epsilon}: not comparable")
            spent.append(total)
        merged = merge_into_teacher(teacher, shipped, devices, scenario.reference_x,
                                    scenario.presumed_train, loop.merge, seed=seed,
                                    rng=np.random.default_rng([seed, 99]),
                                    presumed_val=scenario.presumed_val,
                                    prototype_clip=cfg.policy.prototype_clip)
        user_acc, presumed = {}, []
        for u in users:
            # As run_loop does it: the user's sensor kernel and own claims when the merge made them.
            model = rekd_student(merged.teacher, student_spec, scenario.presumed_train,
                                 merged.transfer_x, loop.rekd, seed=seed + 2,
                                 support=merged.supports[u.name],
                                 domain_kernel=merged.sensor_kernels.get(u.name),
                                 own_claims=merged.own_claims.get(u.name))
            user_acc[u.name] = accuracy(model, u.test)
            presumed.append(accuracy(model, scenario.presumed_test))
        runs.append(VariantRun(v.name, seed, v.noise_draw, user_acc, float(np.mean(presumed)),
                               float(np.mean(sizes)), float(np.mean(deflated)), fedavg,
                               float(np.mean(spent)),
                               time.perf_counter() - t0))
        print(f"  seed {seed} draw {v.noise_draw} {v.name:<22} user {runs[-1].user_mean:.3f} presumed "
              f"{runs[-1].presumed_acc:.3f} bytes {runs[-1].payload_bytes:,.0f} "
              f"U {runs[-1].upload_ratio:.2f} ({runs[-1].seconds:.0f} s)", file=sys.stderr,
              flush=True)
    return runs


def summarise(runs: Sequence[VariantRun], reference: str = VARIANTS[0].name) -> str:
    """A Markdown table: per seed the mean over noise draws, the mean over seeds and draws, and
    each variant's paired difference to ``reference`` (same seed and draw, then averaged)."""
    seeds = sorted({r.seed for r in runs})
    draws = sorted({r.draw for r in runs})
    by = {(r.variant, r.seed, r.draw): r for r in runs}
    names = list(dict.fromkeys(r.variant for r in runs))
    lines = ["| payload | bytes/device | U (vs FedAvg f32) | U deflated | eps spent | user-test acc, "
             f"seed {' / '.join(map(str, seeds))} | mean | d user vs full (pts) | presumed-test "
             f"acc | d presumed vs full (pts) | {' / '.join(runs[0].user_acc) if runs else ''} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        rs = [by[(name, s, d)] for s in seeds for d in draws]
        refs = [by.get((reference, s, d)) for s in seeds for d in draws]
        d_user = d_pres = float("nan")
        if all(refs):
            d_user = 100 * float(np.mean([r.user_mean - f.user_mean
                                          for r, f in zip(rs, refs, strict=True) if f]))
            d_pres = 100 * float(np.mean([r.presumed_acc - f.presumed_acc
                                          for r, f in zip(rs, refs, strict=True) if f]))
        per_seed = " / ".join(f"{np.mean([r.user_mean for r in rs if r.seed == s]):.3f}"
                              for s in seeds)
        per_user = " / ".join(f"{np.mean([r.user_acc[u] for r in rs]):.2f}"
                              for u in rs[0].user_acc)
        lines.append(
            f"| {name} | {np.mean([r.payload_bytes for r in rs]):,.0f} | "
            f"{np.mean([r.upload_ratio for r in rs]):.3f} | "
            f"{np.mean([r.deflated_bytes / r.fedavg_bytes for r in rs]):.3f} | "
            f"{np.mean([r.epsilon_spent for r in rs]):.2f} | "
            f"{per_seed} | "
            f"{np.mean([r.user_mean for r in rs]):.3f} | {d_user:+.1f} | "
            f"{np.mean([r.presumed_acc for r in rs]):.3f} | {d_pres:+.1f} | {per_user} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diredi_secure.benchmarks.payload_size",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--draws", type=int, nargs="+", default=[1],
                        help="noise draws of the histogram/prototypes to run each variant with")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="variant names to run (default: all); the first is the reference")
    parser.add_argument("--json", default=None, help="also write the runs to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--scenario", choices=("digits", "mnist"), default="digits",
                        help="mnist: the MNIST scenario, its models and MNIST_VARIANTS")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every epoch count (CPU-bound studies; variants stay paired)")
    args = parser.parse_args(argv)
    loop: LoopConfig | None = None
    scenario_config: ScenarioConfig | None = None
    variants = VARIANTS
    if args.scenario == "mnist":
        from diredi_secure.ml.mnist import mnist_loop_config, mnist_scenario_config

        loop, scenario_config, variants = mnist_loop_config(), mnist_scenario_config(), MNIST_VARIANTS
    if args.scale != 1.0:
        from .reproduce import scaled_loop_config

        loop = scaled_loop_config(args.scale, base=loop)
    known = {v.name: v for v in variants}
    names = args.variants or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; known: {list(known)}")
    torch.set_num_threads(args.threads)
    runs: list[VariantRun] = []
    for seed in args.seeds:
        runs += run_seed(seed, args.epsilon, [replace(known[n], noise_draw=d)
                                              for d in args.draws for n in names],
                         loop=loop, scenario_config=scenario_config)
    print(f"epsilon {args.epsilon:g}, seeds {args.seeds}, noise draws {args.draws}; FedAvg float32 delta "
          f"{np.mean([r.fedavg_bytes for r in runs]):,.0f} bytes/device")
    print(summarise(runs, reference=names[0]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([{**asdict(r), "user_mean": r.user_mean, "upload_ratio": r.upload_ratio}
                       for r in runs], fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
