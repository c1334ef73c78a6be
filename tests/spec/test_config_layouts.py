"""The device configuration layouts (virtio.spec.config_layouts) against the spec."""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from virtio.devices.blk.wire import BLK_CONFIG
from virtio.spec.config_layouts import (
    INPUT_ABSINFO,
    INPUT_CFG,
    INPUT_DEVIDS,
    INPUT_U_OFFSET,
    INPUT_U_SIZE,
    LAYOUTS,
    TYPE_SIZES,
    ConfigLayout,
    layout_for,
)
from virtio.spec.data_files import device_ids_table, features_table
from virtio.spec.device_ids import DeviceId

SPEC_TAG = "v1.4-cs01"


def test_fields_are_in_order_contiguous_and_fill_the_structure() -> None:
    for layout in LAYOUTS.values():
        at = 0
        for f in layout.fields:
            assert f.offset == at, f"{layout.struct}.{f.name} at {f.offset}, expected {at}"
            assert f.type in TYPE_SIZES
            # A number is 1, 2, 4 or 8 bytes, naturally aligned, as every spec field is.
            if f.is_integer:
                assert f.size in (1, 2, 4, 8) and f.offset % f.size == 0, (layout.struct, f.name)
            at = f.end
        assert at == layout.size, f"{layout.struct}: fields end at {at}, sizeof is {layout.size}"
        names = [f.name for f in layout.fields]
        assert len(names) == len(set(names)), layout.struct


@pytest.mark.parametrize(
    ("device_id", "struct", "size"),
    [
        (DeviceId.NET, "virtio_net_config", 28),
        (DeviceId.BLOCK, "virtio_blk_config", 96),
        (DeviceId.CONSOLE, "virtio_console_config", 12),
        (DeviceId.BALLOON, "virtio_balloon_config", 16),
        (DeviceId.SCSI, "virtio_scsi_config", 36),
        (DeviceId.GPU, "virtio_gpu_config", 20),
        (DeviceId.INPUT, "virtio_input_config", 136),
        (DeviceId.VSOCK, "virtio_vsock_config", 8),
        (DeviceId.CRYPTO, "virtio_crypto_config", 56),
        (DeviceId.IOMMU, "virtio_iommu_config", 40),
        (DeviceId.MEM, "virtio_mem_config", 56),
        (DeviceId.FS, "virtio_fs_config", 44),
        (DeviceId.PMEM, "virtio_pmem_config", 16),
        (DeviceId.RPMB, "virtio_rpmb_config", 3),
        (DeviceId.SPI, "virtio_spi_config", 32),
    ],
)
def test_well_known_structure_sizes(device_id: int, struct: str, size: int) -> None:
    layout = layout_for(device_id)
    assert layout is not None
    assert layout.struct == struct
    assert layout.size == size


def test_well_known_offsets() -> None:
    net, blk = LAYOUTS[DeviceId.NET], LAYOUTS[DeviceId.BLOCK]
    assert net.field("max_virtqueue_pairs").offset == 8
    assert net.field("max_virtqueue_pairs").requires == ("VIRTIO_NET_F_MQ", "VIRTIO_NET_F_RSS")
    assert net.field("mtu").offset == 10 and net.field("speed").offset == 12
    assert blk.field("seg_max").requires == ("VIRTIO_BLK_F_SEG_MAX",)
    assert blk.field("geometry.cylinders").offset == 16
    assert blk.field("topology.opt_io_size").offset == 28
    assert blk.field("num_queues").offset == 34
    assert blk.field("zoned.model").offset == 92
    assert LAYOUTS[DeviceId.SCSI].field("max_lun").offset == 32
    assert LAYOUTS[DeviceId.CRYPTO].field("max_size").offset == 48
    assert LAYOUTS[DeviceId.BALLOON].legacy_order == "little"
    assert not LAYOUTS[DeviceId.CONSOLE].field("emerg_wr").readable
    assert LAYOUTS[DeviceId.PMEM].field("size").invalid_with == ("VIRTIO_PMEM_F_SHMEM_REGION",)


def test_blk_layout_agrees_with_the_block_device_wire_layout() -> None:
    """pyvirtio's own virtio-blk (devices/blk/wire.py) places every field at the same offset."""
    blk = LAYOUTS[DeviceId.BLOCK]
    checked = 0
    for f in blk.fields:
        short = f.name.rsplit(".", 1)[-1]
        try:
            offset = BLK_CONFIG.offset_of(short)
        except (KeyError, ValueError):
            continue
        assert offset == f.offset, f.name
        checked += 1
    assert checked >= 25
    assert BLK_CONFIG.size == blk.size


def test_every_feature_named_exists_for_that_device_type() -> None:
    names = {(row["device_id"], row["name"]) for row in features_table()}
    referenced = 0
    for layout in LAYOUTS.values():
        for f in layout.fields:
            for name in (*f.requires, *f.invalid_with):
                assert (layout.device_id, name) in names, f"{layout.struct}.{f.name}: {name}"
                referenced += 1
    assert referenced >= 40


def test_every_defined_device_type_has_a_layout() -> None:
    """Each device type the spec describes (a Device Types section) has a layout here."""
    defined = {row["id"] for row in device_ids_table() if row["status"] == "defined"}
    assert defined == set(LAYOUTS)
    for device_id in (4, 17, 32, 34):  # entropy, RTC, SCMI, I2C: "None currently defined"
        assert LAYOUTS[device_id].fields == () and LAYOUTS[device_id].size == 0
    assert layout_for(DeviceId.P9) is None  # reserved in the spec: no layout


def test_input_window() -> None:
    layout = LAYOUTS[DeviceId.INPUT]
    assert layout.selector
    assert layout.field("u").offset == INPUT_U_OFFSET and layout.field("u").size == INPUT_U_SIZE
    assert (
        INPUT_CFG["VIRTIO_INPUT_CFG_ID_DEVIDS"] == 3
        and INPUT_CFG["VIRTIO_INPUT_CFG_EV_BITS"] == 0x11
    )
    assert [f.offset for f in INPUT_DEVIDS] == [8, 10, 12, 14]
    assert [f.offset for f in INPUT_ABSINFO] == [8, 12, 16, 20, 24]


# -- against the spec's own text, where a mirror of the spec repository is at hand -----------


def _spec_git_dir() -> str | None:
    if shutil.which("git") is None:
        return None
    for candidate in sorted(glob.glob("/work/.mirror/oasis-tcs+virtio-spec*")):
        for git_dir in (Path(candidate) / "repo", Path(candidate)):
            done = subprocess.run(
                ["git", "--git-dir", str(git_dir), "rev-parse", "--verify", "-q", SPEC_TAG],
                capture_output=True,
                timeout=30,
            )
            if done.returncode == 0:
                return str(git_dir)
    return None


_STRUCT_FIELD = re.compile(r"^(u8|le8|char|le16|le32|le64)\s+(\w+)(?:\[(\d+)\])?;")


def _parse_struct(tex: str, struct: str) -> list[tuple[str, str, int]]:
    """``struct NAME { ... }`` of a listing as (dotted name, type, count), nested flattened."""
    start = tex.index(f"struct {struct} {{")
    lines = tex[start:].splitlines()[1:]
    out: list[tuple[str, str, int]] = []
    nested: list[tuple[str, str, int]] = []
    inside = False
    for raw in lines:
        line = re.sub(r"/\*.*?\*/|//.*", "", raw).strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("struct ") and line.endswith("{"):
            inside, nested = True, []
            continue
        if inside and line.startswith("}"):
            prefix = line.strip("}; ")
            out += [(f"{prefix}.{n}", t, c) for n, t, c in nested]
            inside = False
            continue
        if line.startswith("}"):
            break
        match = _STRUCT_FIELD.match(line)
        assert match, f"{struct}: cannot read {raw!r}"
        entry = (match.group(2), match.group(1), int(match.group(3) or 1))
        (nested if inside else out).append(entry)
    return out


def test_layouts_match_the_spec_text() -> None:
    git_dir = _spec_git_dir()
    if git_dir is None:
        pytest.skip("no mirror of the spec repository (oasis-tcs/virtio-spec) here")
    files = {row["id"]: row.get("file") for row in device_ids_table()}
    compared = 0
    for layout in LAYOUTS.values():
        if not layout.fields or layout.selector:
            continue
        tex = subprocess.run(
            ["git", "--git-dir", git_dir, "show", f"{SPEC_TAG}:{files[layout.device_id]}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        spec_fields = _parse_struct(tex, layout.struct)
        ours = [(f.name, f.type, f.count) for f in layout.fields]
        assert ours == spec_fields, layout.struct
        compared += 1
    assert compared >= 18


def _layout(device_id: int) -> ConfigLayout:
    layout = layout_for(device_id)
    assert layout is not None
    return layout


def test_display_hints() -> None:
    assert _layout(DeviceId.NET).field("mac").display == "mac"
    assert _layout(DeviceId.FS).field("tag").display == "string"
    assert _layout(DeviceId.MEDIA).field("card").display == "string"
    assert _layout(DeviceId.IOMMU).field("page_size_mask").display == "hex"
