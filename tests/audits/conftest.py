"""Registers the ``audit_e2e`` marker (the lead owns pyproject.toml, where it could also go).

``audit_e2e``: an end-to-end audit (fast profile, one RD run plus its shadow runs, about 10-25 s
on one core). Unlike ``slow`` these run in ``make test``: issue 6 requires the positive control and
a DP run in CI. Deselect with ``-m "not audit_e2e"``.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "audit_e2e: end-to-end privacy audit (fast profile, < 90 s); runs in `make test`",
    )
