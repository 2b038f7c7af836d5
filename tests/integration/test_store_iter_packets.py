"""Store.iter_packets: the merge's stream of stored packets, page by page, on both backends."""

from __future__ import annotations

import pytest

from diredi_secure.store import Store

from .test_store_backends import CERT, KEY_ID, T0, open_db, record

__all__ = ["open_db"]


def test_iter_packets_pages_through_list_packets_order(open_db) -> None:  # type: ignore[no-untyped-def]
    store: Store = open_db(default_epsilon_budget=100.0)
    for dev in ("dev2", "dev1"):
        store.register_device(dev, CERT + dev.encode(), KEY_ID, enrolled_at_ms=T0)
    # Two devices with packets at one received time: the order key's later columns decide.
    for c in range(1, 8):
        for dev in ("dev2", "dev1"):
            store.store_packet(record(c, device_id=dev, epsilon=0.1))
    expected = [(p.device_id, p.counter) for p in store.list_packets()]
    assert len(expected) == 14
    for page in (1, 3, 14, 100):
        got = [(p.device_id, p.counter) for p in store.iter_packets(page_size=page)]
        assert got == expected, page
    store.record_release(
        "1",
        "ab" * 32,
        "cd" * 32,
        T0,
        merged_packet_ids=[record(c, device_id="dev1").packet_id for c in (1, 2)],
    )
    unmerged = [(p.device_id, p.counter) for p in store.iter_packets(page_size=4)]
    assert unmerged == [k for k in expected if k not in {("dev1", 1), ("dev1", 2)}]
    assert len(list(store.iter_packets(unmerged_only=False, page_size=5))) == 14
    with pytest.raises(ValueError, match="page_size"):
        next(store.iter_packets(page_size=0))
