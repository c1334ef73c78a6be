"""The main job: `virtio demo` serves a disk and a real guest verifies its data."""

from __future__ import annotations

import pytest

from virtio.cli import main

pytestmark = pytest.mark.guest


@pytest.mark.normative("devicenormative:Device Types / Block Device / Device Operation")
def test_demo_under_uml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--vm", "uml", "--size-mib", "4"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "yes" in out
    assert "VIRTIO_F_VERSION_1" in out
    assert "virtio_blk" in out
