"""The spec tables agree with the spec data copied into the package."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from virtio.spec import features as F
from virtio.spec.device_ids import DeviceId, device_name
from virtio.spec.normative import blocks, is_known
from virtio.spec.status import DeviceStatus

ROOT = Path(__file__).resolve().parents[2]
N_FEATURES_DEV = "devicenormative:Basic Facilities of a Virtio Device / Feature Bits"


def data(name: str) -> dict[str, object]:
    with resources.files("virtio.spec").joinpath("data", name).open("rb") as f:
        result = json.load(f)
    assert isinstance(result, dict)
    return result


def test_every_feature_constant_matches_the_data() -> None:
    features = data("features.json")["features"]
    assert isinstance(features, list)
    for f in features:
        if f["name"] == "UNUSED":
            continue
        assert getattr(F, f["name"]) == f["bit"], f["name"]
    assert {info.name for info in F.ALL_FEATURES} == {
        f["name"] for f in features if f["name"] != "UNUSED"
    }


def test_generated_table_is_up_to_date() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-spec-tables"), "--check"], check=False
    )
    assert out.returncode == 0, "src/virtio/spec/_feature_table.py is stale: rerun the script"


def test_device_ids_match_the_data() -> None:
    rows = data("device-ids.json")["device_ids"]
    assert isinstance(rows, list)
    assert sorted(int(d) for d in DeviceId) == sorted(r["id"] for r in rows)
    assert (int(DeviceId.BLOCK), int(DeviceId.ENTROPY), int(DeviceId.MEDIA)) == (2, 4, 48)
    assert device_name(2) == "block device"
    assert device_name(14).startswith("unassigned")


def test_status_bits_match_the_spec_text() -> None:
    text = (ROOT / "src/virtio/spec/data/normative.json").read_text()
    assert "DEVICE_NEEDS_RESET" in text
    assert [int(s) for s in DeviceStatus] == [1, 2, 4, 8, 16, 64, 128]


def test_every_requires_text_is_parsed() -> None:
    features = data("features.json")["features"]
    assert isinstance(features, list)
    with_requires = [f for f in features if f.get("requires")]
    assert len(with_requires) >= 30
    for f in with_requires:
        info = next(i for i in F.ALL_FEATURES if i.name == f["name"] and i.bit == f["bit"])
        named = set(re.findall(r"VIRTIO_[A-Z0-9_]+", f["requires"]))
        assert {n for group in info.requires for n in group} == named, f["name"]
    rss_ctx = next(i for i in F.ALL_FEATURES if i.name == "VIRTIO_NET_F_HASH_TUNNEL")
    assert rss_ctx.requires == (
        ("VIRTIO_NET_F_CTRL_VQ",),
        ("VIRTIO_NET_F_RSS", "VIRTIO_NET_F_HASH_REPORT"),
    )


@pytest.mark.normative(N_FEATURES_DEV)
def test_unmet_requirements() -> None:
    net = DeviceId.NET
    assert F.unmet_requirements(net, 1 << F.VIRTIO_NET_F_MQ) == [
        "VIRTIO_NET_F_MQ requires VIRTIO_NET_F_CTRL_VQ"
    ]
    assert F.unmet_requirements(net, 1 << F.VIRTIO_NET_F_MQ | 1 << F.VIRTIO_NET_F_CTRL_VQ) == []
    ecn = 1 << F.VIRTIO_NET_F_GUEST_ECN | 1 << F.VIRTIO_NET_F_GUEST_CSUM
    assert F.unmet_requirements(net, ecn)  # needs TSO4 or TSO6
    assert not F.unmet_requirements(net, ecn | 1 << F.VIRTIO_NET_F_GUEST_TSO6)
    assert F.describe(DeviceId.BLOCK, 1 << 5 | 1 << 32) == ["VIRTIO_BLK_F_RO", "VIRTIO_F_VERSION_1"]
    assert F.feature_name(DeviceId.BLOCK, 99) == "bit 99"


def test_normative_blocks_load_lazily_and_completely() -> None:
    all_blocks = blocks()
    assert len(all_blocks) == 309
    assert is_known("devicenormative:Basic Facilities of a Virtio Device / Device Status Field")
    assert not is_known("devicenormative:nothing")


def test_every_normative_id_cited_in_the_code_exists() -> None:
    cited: set[str] = set()
    for path in (ROOT / "src" / "virtio").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for match in re.finditer(r"(?:driver|device)normative:[^\]\[\"'`]+", node.value):
                    cited.add(match.group(0).strip())
    assert len(cited) > 20
    unknown = sorted(c for c in cited if not is_known(c))
    assert unknown == []
