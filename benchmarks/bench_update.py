"""``diredi bench update``: ``diredi edge update`` of one release against SHA-256 of its bytes.

    diredi bench update [--model-mb 256] [--quick]

In one run: a cloud (``CloudServer``, mTLS, its repository) publishes a release whose model is
``--model-mb`` MiB (a hair under: the device's default cap on a file is 256 MiB exactly); a device
workspace is provisioned and enrolled; then the real CLI command runs in a child process, which
reports the seconds of the command itself (from ``main`` in to ``main`` out, interpreter start-up
and imports apart) and its peak RSS. The peak is the child's own ``VmHWM`` (``/proc/self/status``)
where there is one: Linux carries a process's ``ru_maxrss`` across ``fork`` + ``exec``, so a child
forked from this process (which built the 256 MB model) reported this process's size, up to
three times the model, not its own (``resource.getrusage`` is the fallback, and is printed). The ceiling is SHA-256 over the
same model bytes in 1 MiB updates, measured in this process in the same run. Prints each figure
with its ratio and ends with one line::

    update: mb_per_s=X vs_sha256=R peak_rss_mb=P rss_over_model_mb=M startup_s=S vs_fetch_only=F

Speed is reported, never asserted. ``measure_for_ceilings`` gives ``diredi bench ceilings`` the
same figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from diredi_secure.errors import ConfigError

__all__ = ["UpdateFigures", "measure", "measure_for_ceilings", "run"]

MIB = 1024 * 1024

# The child: the real CLI entry point, timed from inside, with its own rusage.
_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from diredi_secure.cli import main
t1 = time.perf_counter()
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
t2 = time.perf_counter()
hwm = None
try:
    with open("/proc/self/status") as status:
        hwm = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    pass
print("BENCH " + json.dumps({"rc": rc, "import_s": t1 - t0, "update_s": t2 - t1,
      "hwm_kib": hwm, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      "torch": "torch" in sys.modules}))
"""

# The transport alone: the same channel and fetcher, the model target streamed and dropped.
_FETCH_CHILD = """
import json, sys, time
from pathlib import Path
from typing import Any
from diredi_secure.services.edge import EdgeAgent
from diredi_secure.services.fetcher import GrpcReleaseFetcher
from diredi_secure.services.workspace import DeviceWorkspace
agent = EdgeAgent(DeviceWorkspace.open(Path(sys.argv[1])))
fetcher = GrpcReleaseFetcher(agent.channel, config=agent.config)
t0 = time.perf_counter()
n = sum(len(c) for c in fetcher.fetch("release:/targets/" + sys.argv[2]))
print("BENCH " + json.dumps({"bytes": n, "fetch_s": time.perf_counter() - t0}))
"""


def _child_json(args: list[str], what: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", *args], capture_output=True, text=True, timeout=1800, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if not lines:
        raise ConfigError(f"{what} failed in the benchmark: {proc.stderr.strip()[-300:]}")
    got: dict[str, Any] = json.loads(lines[-1][len("BENCH ") :])
    got["stdout"] = proc.stdout
    return got


@dataclass(frozen=True)
class UpdateFigures:
    model_mb: float
    update_s: float
    import_s: float
    sha256_mb_per_s: float
    peak_rss_mb: float
    torch_loaded: bool
    rusage_maxrss_mb: float = 0.0
    fetch_only_mb_per_s: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.model_mb / self.update_s

    @property
    def vs_sha256(self) -> float:
        return self.mb_per_s / self.sha256_mb_per_s

    @property
    def rss_over_model_mb(self) -> float:
        return self.peak_rss_mb - self.model_mb


def _sha256_mb_per_s(data: bytes, repeats: int = 3) -> float:
    view = memoryview(data)
    best = float("inf")
    for _ in range(repeats):
        h = hashlib.sha256()
        start = time.perf_counter()
        for i in range(0, len(view), MIB):
            h.update(view[i : i + MIB])
        h.digest()
        best = min(best, time.perf_counter() - start)
    return len(data) / MIB / best


def measure(root: Path, model_mb: int) -> UpdateFigures:
    """Publish a ``model_mb`` MiB release, run ``diredi edge update`` in a child, time both."""
    from diredi_secure.services.cloud import CloudServer
    from diredi_secure.services.edge import EdgeAgent
    from diredi_secure.services.workspace import CloudWorkspace

    from diredi_secure.checkpoint import checkpoint_bytes
    from diredi_secure.release import AuditVerdict, ReleasePredicate
    from diredi_secure.release.repository import ReleaseBundle, ReleaseRepository
    from diredi_secure.store import open_store

    if not 1 <= model_mb <= 256:
        raise ConfigError(
            f"--model-mb must lie in [1, 256] (the device's file cap), got {model_mb}"
        )
    now = datetime.now(UTC).replace(microsecond=0)
    cloud = CloudWorkspace.init(
        root / "cloud", now_ms=int(now.timestamp() * 1000), create_repository=False
    )
    repo = ReleaseRepository.create(cloud.repository_dir, now=now)
    rng = np.random.default_rng(0)  # random bytes: nothing on the path can shortcut zeros
    weights = rng.integers(0, 255, size=model_mb * MIB - 64 * 1024, dtype=np.uint8)
    model = checkpoint_bytes({"w": weights}, {"v": "1"})
    del weights
    sha_rate = _sha256_mb_per_s(model)
    digest = hashlib.sha256(b"bench").hexdigest()
    predicate = ReleasePredicate.build(
        release_version=1, parent_digest=None, parent_version=None, packet_digests=[],
        epsilon=[], accountant="rdp", audit_report_digest=digest,
        audit_verdict=AuditVerdict.PASS, training_config_digest=digest, version="bench",
    )  # fmt: skip
    repo.publish(ReleaseBundle(1, model, b'{"arch": "bench"}', predicate), now=now)
    model_size_mb = len(model) / MIB
    del model
    store = open_store(cloud.store_url())
    server = CloudServer(
        store=store, keys=cloud.keys(), tls=cloud.server_tls(mtls=True),
        repository_dir=cloud.repository_dir,
    )  # fmt: skip
    port = server.start()
    try:
        device = cloud.provision_device(
            root / "device", "bench-device", target=f"127.0.0.1:{port}",
            now_ms=int(time.time() * 1000),
        )  # fmt: skip
        with EdgeAgent(device) as agent:
            agent.enroll()
        got = _child_json(
            [_CHILD, "edge", "update", "--workspace", str(device.root)], "edge update"
        )
        target = next(
            p.relative_to(cloud.repository_dir / "targets").as_posix()
            for p in (cloud.repository_dir / "targets").rglob("*.model.safetensors")
        )
        fetched = _child_json([_FETCH_CHILD, str(device.root), target], "the bare fetch")
    finally:
        server.stop()
        store.close()
    if got["rc"] not in (0, None) or "installed" not in str(got["stdout"]):
        raise ConfigError(f"edge update failed in the benchmark: {str(got['stdout'])[-300:]}")
    return UpdateFigures(
        model_mb=model_size_mb,
        update_s=float(got["update_s"]),
        import_s=float(got["import_s"]),
        sha256_mb_per_s=sha_rate,
        peak_rss_mb=float(got["hwm_kib"] or got["maxrss_kib"]) / 1024,
        rusage_maxrss_mb=float(got["maxrss_kib"]) / 1024,
        fetch_only_mb_per_s=float(fetched["bytes"]) / MIB / float(fetched["fetch_s"]),
        torch_loaded=bool(got["torch"]),
    )


def measure_for_ceilings(*, model_mb: int) -> Mapping[str, float]:
    """The figures ``diredi bench ceilings`` reads (``update_mb_per_s``, ``peak_rss_over_model_mb``)."""
    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp:
        fig = measure(Path(tmp), min(model_mb, 256))
    return {
        "update_mb_per_s": fig.mb_per_s,
        "peak_rss_over_model_mb": fig.rss_over_model_mb,
        "sha256_mb_per_s": fig.sha256_mb_per_s,
        "update_vs_sha256": fig.vs_sha256,
        "fetch_only_mb_per_s": fig.fetch_only_mb_per_s,
    }


def run(model_mb: int, *, out: Callable[[str], None] = print) -> UpdateFigures:
    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp:
        fig = measure(Path(tmp), model_mb)
    out(f"model                          {fig.model_mb:9.1f} MiB")
    out(f"SHA-256 of the same bytes      {fig.sha256_mb_per_s:9.1f} MiB/s  (ceiling)")
    out(f"diredi edge update (gRPC+mTLS) {fig.mb_per_s:9.1f} MiB/s  {fig.vs_sha256:.2f} of SHA-256"
        f"  ({fig.update_s:.2f} s; start-up and imports {fig.import_s:.2f} s apart)")  # fmt: skip
    out(f"the gRPC fetch alone           {fig.fetch_only_mb_per_s:9.1f} MiB/s  "
        f"{fig.fetch_only_mb_per_s / fig.sha256_mb_per_s:.2f} of SHA-256 (the transport's floor; "
        f"the update reaches {fig.mb_per_s / fig.fetch_only_mb_per_s:.2f} of it)")  # fmt: skip
    out(f"peak RSS of the command        {fig.peak_rss_mb:9.1f} MiB  "
        f"({fig.rss_over_model_mb:+.1f} MiB over the model; torch loaded: {fig.torch_loaded}; "
        f"getrusage, inflated by the fork: {fig.rusage_maxrss_mb:.0f} MiB)")  # fmt: skip
    out(
        f"update: mb_per_s={fig.mb_per_s:.1f} vs_sha256={fig.vs_sha256:.3f} "
        f"peak_rss_mb={fig.peak_rss_mb:.1f} rss_over_model_mb={fig.rss_over_model_mb:.1f} "
        f"startup_s={fig.import_s:.2f} vs_fetch_only={fig.mb_per_s / fig.fetch_only_mb_per_s:.3f}"
    )
    return fig


if __name__ == "__main__":  # pragma: no cover
    run(int(os.environ.get("BENCH_UPDATE_MB", "256")))
