"""`virtio probe` against QEMU 7.2's own virtio devices (and pyvirtio's, in process).

Every probe runs as its own `virtio probe --json` process; they all start at
once in one module fixture (each is a QEMU start of about 0.3 s), and the
tests read their results. The values asserted are QEMU 7.2's defaults.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from virtio.devices.blk.device import BlkDevice, BlkOptions
from virtio.probe import probe
from virtio.probe.reader import transport_kind
from virtio.spec.config_layouts import LAYOUTS
from virtio.spec.device_ids import DeviceId
from virtio.transport.mmio import mmio_loopback
from virtio.transport.pci import pci_loopback

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
)

N_CONFIG_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Configuration Space"
N_RESET_DRV = "drivernormative:Basic Facilities of a Virtio Device / Device Reset"

DISK = 16 << 20  # the automatic image: --disk-size's default
GIVEN_DISK = 3 << 20


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        assert self.returncode == 0, self.stderr
        data = json.loads(self.stdout)
        assert isinstance(data, dict)
        return data


def _probe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "virtio.cli", "probe", *args]


def _run(args: list[str]) -> Run:
    done = subprocess.run(
        _probe_cmd(*args), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    return Run(done.returncode, done.stdout, done.stderr)


def _cases(image: Path) -> dict[str, list[str]]:
    drive = f"if=none,id=d0,file={image},format=raw"
    return {
        "net": ["--json", "--qemu", "virtio-net-pci,mq=on"],
        "net-human": ["--qemu", "virtio-net-pci,mq=on"],
        "net-transitional-legacy": ["--json", "--legacy", "--qemu", "virtio-net-pci"],
        "blk": ["--json", "--qemu", "virtio-blk-pci"],
        "blk-given": [
            "--json",
            "--qemu-arg",
            "-drive",
            "--qemu-arg",
            drive,
            "--qemu",
            "virtio-blk-pci,drive=d0,num-queues=4,queue-size=128",
        ],
        "blk-legacy-only": ["--json", "--qemu", "virtio-blk-pci,disable-modern=on"],
        "blk-mmio": ["--json", "--machine", "microvm", "--qemu", "virtio-blk-device"],
        "blk-mmio-legacy": [
            "--json",
            "--machine",
            "microvm",
            "--legacy",
            "--qemu",
            "virtio-blk-device",
        ],
        "rng-mmio-auto-machine": ["--json", "--qemu", "virtio-rng-device"],
        "scsi": ["--json", "--qemu", "virtio-scsi-pci"],
        "serial": ["--json", "--qemu", "virtio-serial-pci"],
        "balloon": ["--json", "--qemu", "virtio-balloon-pci"],
        "gpu": ["--json", "--qemu", "virtio-gpu-pci"],
        "keyboard": ["--json", "--qemu", "virtio-keyboard-pci"],
        "tablet": ["--json", "--qemu", "virtio-tablet-pci"],
        "rng": ["--json", "--qemu", "virtio-rng-pci"],
        "crypto": ["--json", "--qemu", "virtio-crypto-pci"],
        "iommu": ["--json", "--qemu", "virtio-iommu-pci"],
        "mem": ["--json", "--qemu", "virtio-mem-pci"],
        "pmem": ["--json", "--qemu", "virtio-pmem-pci"],
        "9p": ["--json", "--qemu", "virtio-9p-pci,mount_tag=probetag"],
        # Bad input.
        "unknown-device": ["--qemu", "virtio-nett-pci"],
        "unknown-property": ["--qemu", "virtio-net-pci,mqq=on"],
        "not-virtio": ["--qemu", "e1000"],
        "qemu-exits": ["--qemu", "virtio-net-pci,mac=not-a-mac"],
        "no-legacy-interface": ["--legacy", "--qemu", "virtio-gpu-pci"],
        "wrong-machine": ["--machine", "microvm", "--qemu", "virtio-net-pci"],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    image = tmp_path_factory.mktemp("probe") / "given.img"
    with open(image, "wb") as f:
        f.truncate(GIVEN_DISK)
    cases = _cases(image)
    with ThreadPoolExecutor(max_workers=max(2, min(8, (os.cpu_count() or 2) * 2))) as pool:
        futures = {name: pool.submit(_run, args) for name, args in cases.items()}
        yield {name: future.result() for name, future in futures.items()}


def _queues(data: dict[str, Any]) -> list[int]:
    queues = data["queues"]
    assert [q["index"] for q in queues] == list(range(len(queues)))
    assert data["num_queues"] == len(queues)
    return [q["max_size"] for q in queues]


def _common(data: dict[str, Any], transport: str, device_id: int, device_type: str) -> None:
    assert data["transport"] == transport
    assert data["device_id"] == device_id
    assert data["device_type"] == device_type
    assert data["status_after_reset"] == 0
    assert "guest_errors" not in data["qemu"], data["qemu"]


# -- network -----------------------------------------------------------------------------------


def test_net_with_mq(runs: dict[str, Run]) -> None:
    data = runs["net"].json()
    _common(data, "pci", 1, "network device")
    features = data["features"]
    assert "VIRTIO_NET_F_MQ" in features and "VIRTIO_NET_F_MAC" in features
    assert "VIRTIO_F_VERSION_1" in features and "VIRTIO_NET_F_CTRL_VQ" in features
    assert data["device_features"] >> 22 & 1  # VIRTIO_NET_F_MQ is bit 22
    config = data["config"]
    # One queue pair: QEMU takes the pair count from the back-end, and there is none.
    assert config["max_virtqueue_pairs"] == 1
    assert config["mac"] == "52:54:00:12:34:56"
    assert config["status"] & 1  # VIRTIO_NET_S_LINK_UP
    assert data["config_absent"]["mtu"] == ["VIRTIO_NET_F_MTU"]
    assert "speed" not in config and "supported_tunnel_types" not in config
    # receiveq1, transmitq1, controlq (before negotiation, as QEMU lays them out).
    assert _queues(data) == [256, 256, 64]
    assert data["transport_info"]["pci_id"] == "1af4:1000"
    assert data["transport_info"]["interfaces"] == "modern+legacy"


def test_net_human_output(runs: dict[str, Run]) -> None:
    run = runs["net-human"]
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[1].split()[:2] == ["transport", "pci"]
    assert any(line.split() == ["22", "VIRTIO_NET_F_MQ"] for line in lines)
    assert any(line.split() == ["max_virtqueue_pairs", "1"] for line in lines)
    assert any(line.split() == ["mac", "52:54:00:12:34:56"] for line in lines)
    values = [line for line in lines if line.startswith("  ") and line.split()[0] == "mac"]
    status = [line for line in lines if line.split()[:1] == ["status"]]
    # The values of one block start in the same column.
    assert values[0].index("52:") == status[0].index("0x1")
    assert any(line.split() == ["queues", "3"] for line in lines)


def test_net_transitional_through_its_legacy_interface(runs: dict[str, Run]) -> None:
    data = runs["net-transitional-legacy"].json()
    _common(data, "pci-legacy", 1, "network device")
    assert data["device_features"] < 1 << 32  # a legacy interface has 32 feature bits
    assert "VIRTIO_F_VERSION_1" not in data["features"]
    assert "VIRTIO_NET_F_MAC" in data["features"]
    assert data["config"]["mac"] == "52:54:00:12:34:56"
    assert _queues(data) == [256, 256, 64]


# -- block -------------------------------------------------------------------------------------


def test_blk_gets_an_automatic_image(runs: dict[str, Run]) -> None:
    data = runs["blk"].json()
    _common(data, "pci", 2, "block device")
    assert data["config"]["capacity"] == DISK // 512
    assert any("drive" in b for b in data["qemu"]["backends"])
    assert "drive=probe-drive0" in data["qemu"]["device"]
    assert "VIRTIO_BLK_F_SEG_MAX" in data["features"]
    # QEMU 7.2: num-queues defaults to one per vCPU (one here), queue-size to 256, and
    # seg_max is queue-size - 2; no MQ with a single queue.
    assert data["config"]["seg_max"] == 254
    assert data["config"]["blk_size"] == 512
    assert "VIRTIO_BLK_F_MQ" not in data["features"]
    assert data["config_absent"]["num_queues"] == ["VIRTIO_BLK_F_MQ"]
    assert _queues(data) == [256]


def test_blk_with_a_given_drive_and_queues(runs: dict[str, Run]) -> None:
    data = runs["blk-given"].json()
    _common(data, "pci", 2, "block device")
    assert data["config"]["capacity"] == GIVEN_DISK // 512
    assert data["qemu"]["backends"] == []
    assert "VIRTIO_BLK_F_MQ" in data["features"]
    assert data["config"]["num_queues"] == 4
    assert data["config"]["seg_max"] == 126
    assert _queues(data) == [128] * 4


def test_legacy_only_blk_is_probed_through_the_legacy_interface(runs: dict[str, Run]) -> None:
    data = runs["blk-legacy-only"].json()
    _common(data, "pci-legacy", 2, "block device")
    assert data["transport_info"]["pci_id"] == "1af4:1001"
    assert data["transport_info"]["interfaces"] == "legacy"
    assert data["device_features"] < 1 << 32
    assert "VIRTIO_F_VERSION_1" not in data["features"]
    assert "VIRTIO_F_NOTIFY_ON_EMPTY" in data["features"]  # a legacy-only core bit
    assert data["config"]["capacity"] == DISK // 512
    assert data["config"]["geometry.heads"] == 16 and data["config"]["geometry.sectors"] == 63
    assert _queues(data) == [256]  # found by selecting queues until one has size 0


def test_blk_on_virtio_mmio(runs: dict[str, Run]) -> None:
    data = runs["blk-mmio"].json()
    _common(data, "mmio", 2, "block device")
    assert data["qemu"]["machine"] == "microvm"
    assert data["transport_info"]["version"] == 2
    assert data["transport_info"]["vendor_id"] == "0x554d4551"  # "QEMU"
    assert "VIRTIO_F_VERSION_1" in data["features"]
    assert data["config"]["capacity"] == DISK // 512
    # QEMU 7.2's virtio-mmio shows QueueSizeMax 1024 (its VIRTQUEUE_MAX_SIZE) for every
    # queue that exists, whatever the device's own queue size.
    assert _queues(data) == [1024]


def test_blk_on_legacy_virtio_mmio(runs: dict[str, Run]) -> None:
    data = runs["blk-mmio-legacy"].json()
    _common(data, "mmio-legacy", 2, "block device")
    assert data["transport_info"]["version"] == 1
    assert "VIRTIO_F_VERSION_1" not in data["features"]
    assert data["config"]["capacity"] == DISK // 512
    assert _queues(data) == [1024]


def test_a_virtio_bus_device_picks_microvm(runs: dict[str, Run]) -> None:
    data = runs["rng-mmio-auto-machine"].json()
    _common(data, "mmio", 4, "entropy source")
    assert data["qemu"]["machine"] == "microvm"
    assert _queues(data) == [1024]


# -- the other device types ----------------------------------------------------------------------


def test_scsi(runs: dict[str, Run]) -> None:
    data = runs["scsi"].json()
    _common(data, "pci", 8, "SCSI host")
    config = data["config"]
    assert config["num_queues"] == 1
    assert config["sense_size"] == 96 and config["cdb_size"] == 32  # as after every reset
    assert config["max_target"] == 255 and config["max_lun"] == 16383
    assert config["seg_max"] == 254
    assert data["config_absent"] == {}
    assert "VIRTIO_SCSI_F_HOTPLUG" in data["features"]
    assert _queues(data) == [256, 256, 256]  # controlq, eventq, one request queue


def test_serial(runs: dict[str, Run]) -> None:
    data = runs["serial"].json()
    _common(data, "pci", 3, "console")
    assert "VIRTIO_CONSOLE_F_MULTIPORT" in data["features"]
    assert data["config"]["max_nr_ports"] == 31
    assert "emerg_wr" not in data["config"]  # the driver writes it
    assert data["config_absent"]["cols"] == ["VIRTIO_CONSOLE_F_SIZE"]
    # Port 0's pair, the control pair, then ports 1..30: two queues each.
    assert _queues(data) == [128, 128, 32, 32] + [128] * 60


def test_balloon(runs: dict[str, Run]) -> None:
    data = runs["balloon"].json()
    _common(data, "pci", 5, "memory ballooning (traditional)")
    assert "VIRTIO_BALLOON_F_STATS_VQ" in data["features"]
    assert data["config"]["num_pages"] == 0 and data["config"]["actual"] == 0
    assert "free_page_hint_cmd_id" in data["config_absent"]
    assert _queues(data) == [128, 128, 128]  # inflateq, deflateq, statsq


def test_gpu(runs: dict[str, Run]) -> None:
    data = runs["gpu"].json()
    _common(data, "pci", 16, "GPU device")
    assert "VIRTIO_GPU_F_EDID" in data["features"]
    assert data["config"]["num_scanouts"] == 1
    assert data["config"]["events_read"] == 0
    assert data["config_absent"]["blob_alignment"] == ["VIRTIO_GPU_F_BLOB_ALIGNMENT"]
    assert _queues(data) == [64, 16]  # controlq, cursorq


def test_keyboard_through_the_input_select_window(runs: dict[str, Run]) -> None:
    data = runs["keyboard"].json()
    _common(data, "pci", 18, "Input device")
    config = data["config"]
    assert config["name"] == "QEMU Virtio Keyboard"
    assert config["devids.bustype"] == 6  # BUS_VIRTUAL
    assert config["devids.vendor"] == 0x0627
    keys = config["ev_bits.EV_KEY"]
    assert 30 in keys and 28 in keys and len(keys) > 100  # KEY_A, KEY_ENTER, ...
    assert config["ev_bits.EV_LED"] == [0, 1, 2]  # num, caps and scroll lock
    assert not any(k.startswith("abs_info") for k in config)
    assert _queues(data) == [64, 64]  # eventq, statusq


def test_tablet_absolute_axes(runs: dict[str, Run]) -> None:
    data = runs["tablet"].json()
    config = data["config"]
    assert config["name"] == "QEMU Virtio Tablet"
    assert config["ev_bits.EV_ABS"] == [0, 1]
    assert config["abs_info.0.max"] == 0x7FFF and config["abs_info.1.max"] == 0x7FFF


def test_rng(runs: dict[str, Run]) -> None:
    data = runs["rng"].json()
    _common(data, "pci", 4, "entropy source")
    assert data["config"] == {} and data["config_struct"] is None
    assert set(data["features"]) <= {
        "VIRTIO_F_INDIRECT_DESC",
        "VIRTIO_F_EVENT_IDX",
        "VIRTIO_F_VERSION_1",
        "VIRTIO_F_RING_RESET",
        "VIRTIO_F_ACCESS_PLATFORM",
    }
    assert "VIRTIO_F_VERSION_1" in data["features"]
    assert _queues(data) == [8]


def test_crypto_with_its_automatic_backend(runs: dict[str, Run]) -> None:
    data = runs["crypto"].json()
    _common(data, "pci", 20, "Crypto device")
    assert data["config"]["status"] == 1  # VIRTIO_CRYPTO_S_HW_READY
    assert data["config"]["max_dataqueues"] == 1
    assert _queues(data) == [1024, 1024]


def test_iommu(runs: dict[str, Run]) -> None:
    data = runs["iommu"].json()
    _common(data, "pci", 23, "IOMMU device")
    assert "VIRTIO_IOMMU_F_MAP_UNMAP" in data["features"]
    assert data["config"]["page_size_mask"] & 0xFFF == 0 and data["config"]["page_size_mask"]
    assert data["config"]["probe_size"] == 512
    assert _queues(data) == [256, 256]


def test_mem_and_pmem_with_automatic_memory(runs: dict[str, Run]) -> None:
    mem, pmem = runs["mem"].json(), runs["pmem"].json()
    _common(mem, "pci", 24, "Memory device")
    assert mem["config"]["block_size"] == 2 << 20
    assert mem["config"]["region_size"] == 128 << 20
    assert mem["config"]["plugged_size"] == 0
    _common(pmem, "pci", 27, "PMEM device")
    assert pmem["config"]["size"] == 128 << 20
    assert pmem["config"]["start"] == mem["config"]["addr"]  # both at the device memory base


def test_9p_has_no_spec_layout_so_its_raw_bytes(runs: dict[str, Run]) -> None:
    data = runs["9p"].json()
    _common(data, "pci", 9, "9P transport")
    raw = bytes.fromhex(data["config"]["raw"])
    assert raw[:2] == len("probetag").to_bytes(2, "little") and raw[2:] == b"probetag"
    assert any("no configuration layout" in note for note in data["config_notes"])


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("unknown-device", 2, "no device 'virtio-nett-pci' (did you mean virtio-net-pci"),
        ("unknown-property", 2, "no property 'mqq' (did you mean mq?)"),
        ("not-virtio", 2, "e1000 is not a virtio device"),
        ("qemu-exits", 1, "QEMU exited:"),
        ("no-legacy-interface", 2, "has no legacy interface"),
        ("wrong-machine", 2, "microvm has no PCI bus"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(
    runs: dict[str, Run], case: str, code: int, words: str
) -> None:
    run = runs[case]
    assert run.returncode == code, run.stderr
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("virtio probe: ") and words in lines[0]


# -- in process: pyvirtio's own block device, every configuration access checked ----------------


class Recording:
    """A transport whose configuration reads are recorded, with the generation reads."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.device_id: int = inner.device_id
        self.legacy: bool = inner.legacy
        self.legacy_order = inner.legacy_order
        self.log: list[tuple[str, int, int]] = []

    def read_config(self, offset: int, size: int) -> bytes:
        self.log.append(("read", offset, size))
        data: bytes = self.inner.read_config(offset, size)
        return data

    def config_generation(self) -> int:
        self.log.append(("generation", 0, 0))
        value: int = self.inner.config_generation()
        return value

    def write_status(self, value: int) -> None:
        if value == 0:
            # What the device thought of the accesses so far (a reset forgets it).
            self.log.append(("before-reset", self.inner.read_status(), 0))
        self.log.append(("write-status", value, 0))
        self.inner.write_status(value)

    def read_status(self) -> int:
        value: int = self.inner.read_status()
        self.log.append(("read-status", value, 0))
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.normative(N_CONFIG_DRV, N_RESET_DRV)
@pytest.mark.parametrize("shape", ["pci", "pci-legacy", "mmio", "mmio-legacy"])
def test_probe_reads_only_offered_fields_with_their_own_width(tmp_path: Path, shape: str) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as out:
        out.truncate(8 << 20)
    device = BlkDevice(image, BlkOptions(discard=False, num_queues=2, workers=0))
    try:
        if shape.startswith("pci"):
            inner: Any = pci_loopback(
                device, transitional=True, force_legacy=shape.endswith("legacy")
            )
        else:
            inner = mmio_loopback(device, version=1 if shape.endswith("legacy") else 2)
        transport = Recording(inner)
        result = probe(transport, kind=transport_kind(inner, mmio=shape.startswith("mmio")))
        assert result.transport == shape
        log = transport.log
        # The device never found an access wrong (DEVICE_NEEDS_RESET) before either reset...
        assert all(not value & 0x40 for kind, value, _ in log if kind == "before-reset")
        # ...and each reset was taken as complete only once the status read back 0.
        resets = [
            i for i, (kind, value, _) in enumerate(log) if kind == "write-status" and value == 0
        ]
        assert len(resets) == 2
        for i in resets:
            assert log[i + 1] == ("read-status", 0, 0)
        assert result.status_after_reset == 0

        layout = LAYOUTS[DeviceId.BLOCK]
        offered = set(result.features)
        fields = {f.offset: f for f in layout.fields}
        reads = [(off, size) for kind, off, size in log if kind == "read"]
        for offset, size in reads:
            f = next(f for f in layout.fields if f.offset <= offset < f.end)
            # Only fields whose feature is offered (or that need none) are read...
            assert not f.requires or offered & set(f.requires), f.name
            # ...each with one access of its own width (64-bit ones as 32-bit halves).
            if f.is_integer:
                assert (offset, size) == (f.offset, f.size), f.name
            else:
                assert size == 1
        assert {fields[o].name for o, _ in reads if o in fields} >= {"capacity", "num_queues"}
        assert not any(layout.field("max_discard_sectors").offset == o for o, _ in reads)
        # The reads sit between two reads of the generation (modern: the same value).
        kinds = [kind for kind, _, _ in log if kind in ("generation", "read")]
        assert kinds[0] == "generation" and kinds[-1] == "generation"
        assert kinds.count("generation") == 2

        assert result.config["capacity"] == (8 << 20) // 512
        assert result.config["num_queues"] == 2
        assert result.config["seg_max"] == 254
        assert result.config["topology.physical_block_exp"] == 3  # 4096-byte physical blocks
        assert "max_discard_sectors" in result.config_absent
        assert [q.max_size for q in result.queues] == [256, 256]
    finally:
        device.close()
