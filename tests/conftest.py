"""Suite-wide checks: every normative id a test cites must exist in the spec data."""

from __future__ import annotations

import pytest

from virtio.spec.normative import is_known


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unknown: set[str] = set()
    for item in items:
        for mark in item.iter_markers("normative"):
            for block_id in mark.args:
                if not isinstance(block_id, str) or not is_known(block_id):
                    unknown.add(repr(block_id))
    if unknown:
        raise pytest.UsageError(
            "tests cite normative ids that are not in normative.json: " + ", ".join(sorted(unknown))
        )
