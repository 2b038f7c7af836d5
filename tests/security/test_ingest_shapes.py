"""Issue 14 finding 7: ingest checks every entry against the model it claims to update.

A 64 x 10 tensor relabelled ``label_histogram``, reference logits with 64 rows where the release's
reference set has 300, and the other shapes the merge indexes by, are refused at ingest
(``payload_invalid``, naming the entry) by a real server whose shapes come from the release
repository's safetensors headers: nothing is stored, the device's counter and epsilon stay where
they were, and an honest packet against the same model is accepted after.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
import pytest
from diredi_secure.services import jobs
from diredi_secure.services.cloud import CloudServer, ReleasedModelShapes
from diredi_secure.services.edge import EdgeAgent, RetryPolicy
from diredi_secure.services.workspace import CloudWorkspace

from diredi_secure import privacy
from diredi_secure.errors import PayloadInvalid
from diredi_secure.knowledge import DPParameters, KnowledgePayload, PayloadKind, PayloadTensor
from diredi_secure.ml.payload_fit import ModelShapes
from diredi_secure.store import Store
from tests.conftest import honest_dp

REF_ROWS = 300  # the digits scenario's public reference set
PARAMS = 2_410  # the default edge MLP (64 -> 32 -> 10)
DP_HIST = honest_dp(2.0, histogram=True)
SCHED = privacy.schedule_for(2.0, histogram=True, prototypes=False)


@dataclass
class Released:
    ws: CloudWorkspace
    store: Store
    agent: EdgeAgent
    model_sha: str


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Released]:
    root = tmp_path_factory.mktemp("shapes")
    ws = CloudWorkspace.init(root / "cloud", now_ms=int(time.time() * 1000))
    tiny = jobs.JobSettings.tiny()  # one epoch each: the test needs a real release, not accuracy
    settings = replace(tiny, teacher=replace(tiny.teacher, epochs=1), kd=replace(tiny.kd, epochs=1))
    jobs.distill_and_release(ws, now=datetime.now(UTC), seed=1, settings=settings)
    model_sha = json.loads((ws.root / "releases.json").read_text())["fleet"][0]["sha256"]
    store = ws.open_store()
    server = CloudServer(store=store, keys=ws.keys(), tls=ws.server_tls(mtls=True),
                         repository_dir=ws.repository_dir, max_workers=4,
                         released_models=ws.released_models())
    port = server.start()
    dws = ws.provision_device(root / "dev", "device-s", target=f"127.0.0.1:{port}",
                              now_ms=int(time.time() * 1000))
    agent = EdgeAgent(dws, retry=RetryPolicy(attempts=1), sleep=lambda _s: None, rng=random.Random(0))
    agent.enroll()
    try:
        yield Released(ws, store, agent, model_sha)
    finally:
        agent.close()
        server.stop(grace_s=0.5)
        store.close()


def _logits(rows: int = REF_ROWS, index: np.ndarray | None = None) -> PayloadTensor:
    values = np.random.default_rng(rows).normal(size=(rows, 10)).astype(np.float32)
    return PayloadTensor("reference_logits", PayloadKind.REFERENCE_LOGITS, values, "float16",
                         index=index)


def _histogram(shape: tuple[int, ...] = (10,)) -> PayloadTensor:
    sigma = SCHED.histogram_noise_multiplier
    assert sigma is not None
    return PayloadTensor("label_histogram", PayloadKind.LABEL_HISTOGRAM,
                         np.random.default_rng(1).normal(size=shape) + 30, "float32",
                         noise_multiplier=sigma, epsilon=privacy.gaussian_epsilon(sigma, SCHED.delta))


def _delta(size: int, index: np.ndarray | None = None) -> PayloadTensor:
    return PayloadTensor("weight_delta", PayloadKind.WEIGHT_DELTA, np.zeros(size, np.float32),
                         "float32", index=index)


CASES: list[tuple[str, Callable[[], tuple[PayloadTensor, ...]], DPParameters, str]] = [
    ("64x10_relabelled_label_histogram", lambda: (_logits(), _histogram((64, 10))), DP_HIST,
     "entry label_histogram: label_histogram must have 10 values"),
    ("reference_logits_with_64_rows", lambda: (_logits(64),), honest_dp(2.0),
     "entry reference_logits: reference_logits has 64 rows, reference has 300"),
    ("reference_logits_with_11_columns", lambda: (PayloadTensor(
        "reference_logits", PayloadKind.REFERENCE_LOGITS, np.zeros((REF_ROWS, 11)), "float16"),),
     honest_dp(2.0), "entry reference_logits: reference_logits must be [M, 10]"),
    ("top_m_index_past_the_reference_set", lambda: (_logits(2, index=np.array([5, REF_ROWS])),),
     honest_dp(2.0), "entry reference_logits: reference_logits index points past"),
    ("weight_delta_of_another_model", lambda: (_delta(PARAMS + 1),), honest_dp(2.0),
     f"entry weight_delta: weight_delta has {PARAMS + 1} values, model {PARAMS}"),
    ("top_k_index_past_the_model", lambda: (_delta(1, index=np.array([PARAMS])),), honest_dp(2.0),
     "entry weight_delta: weight_delta index points past"),
    ("second_entry_of_one_kind", lambda: (_logits(), replace(_logits(), name="more_logits")),
     honest_dp(2.0), "entry more_logits: a second reference_logits entry"),
]


@pytest.mark.parametrize(("name", "entries", "dp", "message"), CASES, ids=[c[0] for c in CASES])
def test_an_entry_that_does_not_fit_the_release_is_refused_at_ingest(
    released: Released, name: str, entries: Callable[[], tuple[PayloadTensor, ...]],
    dp: DPParameters, message: str,
) -> None:
    store, device = released.store, "device-s"
    before = (store.list_packets(unmerged_only=False), store.highest_counter(device),
              store.epsilon_spent(device))
    with pytest.raises(PayloadInvalid) as info:
        released.agent.submit_payload(KnowledgePayload(entries()), dp=dp,
                                      base_model_version=released.model_sha)
    assert message in info.value.message, info.value.message
    after = (store.list_packets(unmerged_only=False), store.highest_counter(device),
             store.epsilon_spent(device))
    assert after == before, f"{name}: something was stored or charged"


def test_an_honest_packet_against_the_release_is_accepted(released: Released) -> None:
    body = released.agent.submit_payload(KnowledgePayload((_logits(), _histogram())), dp=DP_HIST,
                                         base_model_version=released.model_sha)
    assert body.device_id == "device-s"
    top_m = released.agent.submit_payload(
        KnowledgePayload((_logits(2, index=np.array([0, REF_ROWS - 1])),)), dp=honest_dp(2.0),
        base_model_version=released.model_sha)
    assert top_m.device_id == "device-s"


def test_shapes_come_from_the_release_headers(released: Released) -> None:
    shapes = ReleasedModelShapes(released.ws.repository_dir)
    assert shapes(released.model_sha, None) == ModelShapes(
        parameters=PARAMS, reference_rows=REF_ROWS, image_shape=(1, 8, 8))
    assert shapes("0" * 64, None) is None  # not in the repository: left to the merge
    assert shapes(released.model_sha, "device-s") is None  # not released to that device's role


def test_the_ingest_path_imports_no_torch() -> None:
    """The shape rule is numpy only: a cloud server that checks shapes does not load torch."""
    import subprocess
    import sys

    code = ("import sys; import diredi_secure.services.cloud, diredi_secure.ml.payload_fit; "
            "sys.exit(int('torch' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
