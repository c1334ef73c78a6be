"""The Linux kernel's own virtio_pci driver against pyvirtio's PCI functions.

`virtio serve blk|rng --transport pci[-transitional]` serve the functions;
`virtio qemu --pci ...` attaches them to a QEMU TCG guest through QEMU's
multi-process proxy and relays their interrupts. Linux then drives our
configuration space, BARs, MSI-X table and ISR: fio with verification on the
disk, a read of /dev/hwrng, and the guest's own view (sysfs ids,
/proc/interrupts) of what it found.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import BlkServer, ServeProcess
from virtio.vm import GuestAssets, GuestResult, run_guest

pytestmark = pytest.mark.guest

N_PCI = "Virtio Transport Options / Virtio Over PCI Bus"
N_PCI_DEV = f"devicenormative:{N_PCI}"
N_DISCOVERY_DEV = f"devicenormative:{N_PCI} / PCI Device Discovery"
N_USED_NOTIFY_DEV = (
    f"devicenormative:{N_PCI} / PCI-specific Initialization And Device Operation / "
    "Used Buffer Notifications"
)
N_MSIX_DEV = (
    f"devicenormative:{N_PCI} / PCI-specific Initialization And Device Operation / "
    "Device Initialization / MSI-X Vector Configuration"
)
N_ISR_DEV = f"devicenormative:{N_PCI} / PCI Device Layout / ISR status capability"
N_CAPS_DEV = f"devicenormative:{N_PCI} / Virtio Structure PCI Capabilities"
N_BLK_DEV_OP = "devicenormative:Device Types / Block Device / Device Operation"
N_ENTROPY_DEV = "devicenormative:Device Types / Entropy Device / Device Operation"

TIMEOUT = 150.0

SCRIPT = """
set -e
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor)" = 0x1af4 ] || continue
  echo "PCI $(cat $d/device) $(cat $d/revision) $(cat $d/subsystem_device) \
    $(basename $(readlink $d/driver)) $(basename $d/virtio*) $(cat $d/class) \
    $(grep -cv '^0x0000000000000000 0x0000000000000000' $d/resource)"
done
hostrun /usr/bin/fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio \\
  --rw=randwrite --bs=4k --iodepth=32 --size=4M --verify=crc32c --verify_fatal=1 \\
  --output-format=terse | cut -d';' -f1-5 | sed 's/^/FIO /'
echo "RNG $(dd if=/dev/hwrng bs=32 count=4 2>/dev/null | wc -c) $(cat /sys/class/misc/hw_random/rng_current)"
grep virtio /proc/interrupts | sed 's/^/IRQ /'
"""


@pytest.fixture
def rng_server(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    servers: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        n = len(servers)
        server = ServeProcess(
            None, tmp_path / f"vrng{n}.sock", list(args), tmp_path / f"rng{n}.log", kind="rng"
        )
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def boot(
    assets: GuestAssets, servers: list[ServeProcess], kernel_args: tuple[str, ...] = ()
) -> GuestResult:
    launcher = [sys.executable, "-m", "virtio.cli", "qemu"]
    for server in servers:
        launcher += ["--pci", str(server.socket)]
    result = run_guest(
        SCRIPT,
        vm="qemu",
        timeout=TIMEOUT,
        host_share=True,  # fio from the host
        assets=assets,
        kernel_args=kernel_args,
        launcher=[*launcher, "--"],
    )
    logs = "\n".join(s.log_text() for s in servers)
    assert not result.timed_out, f"guest timed out:\n{result.output[-3000:]}\n{logs}"
    assert result.exit_code == 0, f"guest script failed:\n{result.output[-3000:]}\n{logs}"
    return result


def lines(result: GuestResult, tag: str) -> list[list[str]]:
    return [line.split()[1:] for line in result.section().splitlines() if line.startswith(tag)]


def functions(result: GuestResult) -> dict[str, list[str]]:
    """PCI device id -> [revision, subsystem id, driver, virtio name, class, BARs assigned]."""
    return {fields[0]: fields[1:] for fields in lines(result, "PCI")}


def interrupts(result: GuestResult, pci_id: str, kind: str) -> dict[str, int]:
    """The guest's interrupt lines of one function (``kind``: PCI-MSI or IO-APIC).

    Keyed by GSI or vector name; values are counts (one CPU).
    """
    name = functions(result)[pci_id][3]
    found = {}
    for fields in lines(result, "IRQ"):
        text = " ".join(fields)
        if kind in text and re.search(rf"\b{name}\b", text):
            key = fields[0].rstrip(":") if kind == "IO-APIC" else fields[-1]
            found[key] = int(fields[1])
    return found


def check_io(result: GuestResult) -> None:
    fio = [fields[0].split(";") for fields in lines(result, "FIO")]
    # fio's terse output: version; fio version; job name; group; error.
    assert len(fio) == 1 and fio[0][2:5] == ["verify", "0", "0"], f"fio failed: {fio}"
    rng = lines(result, "RNG")
    assert rng == [["128", "virtio_rng.0"]], rng


Booted = tuple[GuestResult, list[ServeProcess]]


@pytest.fixture
def pci_guest(
    guest_assets: GuestAssets,
    blk_server: Callable[..., BlkServer],
    rng_server: Callable[..., ServeProcess],
) -> Callable[..., Booted]:
    """Serve blk and rng over ``transport``, boot the guest, check its I/O."""

    def run(transport: str, *kernel_args: str) -> Booted:
        servers = [blk_server("--transport", transport), rng_server("--transport", transport)]
        result = boot(guest_assets, servers, kernel_args)
        check_io(result)
        return result, servers

    return run


def used_legacy(servers: list[ServeProcess]) -> list[bool]:
    return ["the driver uses the legacy interface" in s.log_text() for s in servers]


# A real PCI stack (SeaBIOS, then Linux's PCI core and virtio_pci) enumerates,
# sizes and enables the functions: the interface meets what PCI requires of it.
@pytest.mark.normative(N_PCI_DEV, N_DISCOVERY_DEV, N_USED_NOTIFY_DEV, N_MSIX_DEV, N_CAPS_DEV)
@pytest.mark.normative(N_BLK_DEV_OP, N_ENTROPY_DEV)
def test_linux_virtio_pci_uses_modern_functions_with_msix(
    pci_guest: Callable[..., Booted],
) -> None:
    result, servers = pci_guest("pci")
    # Modern ids: 0x1040 + device type, revision 1, driven by virtio-pci.
    found = functions(result)
    for pci_id, klass in (("0x1042", "0x010000"), ("0x1044", "0xff0000")):
        revision, subsystem, driver, _name, found_class, bars = found[pci_id]
        # Non-transitional: revision 1 or higher, a subsystem id of 0x40 or higher.
        assert (revision, driver) == ("0x01", "virtio-pci") and int(subsystem, 16) >= 0x40
        # The firmware sized and placed both memory BARs (MSI-X, and the virtio structures).
        assert (found_class, bars) == (klass, "2"), found[pci_id]
    # One vector per queue and one for configuration changes; the queues' fired.
    disk, entropy = found["0x1042"][3], found["0x1044"][3]
    vectors = interrupts(result, "0x1042", "PCI-MSI")
    assert vectors.keys() == {f"{disk}-config", f"{disk}-req.0"} and vectors[f"{disk}-req.0"] > 0
    assert interrupts(result, "0x1044", "PCI-MSI")[f"{entropy}-input"] > 0
    assert used_legacy(servers) == [False, False]


@pytest.mark.normative(N_DISCOVERY_DEV, N_USED_NOTIFY_DEV, N_MSIX_DEV)
@pytest.mark.normative(N_BLK_DEV_OP, N_ENTROPY_DEV)
def test_linux_legacy_driver_uses_transitional_functions_with_msix(
    pci_guest: Callable[..., Booted],
) -> None:
    result, servers = pci_guest("pci-transitional", "virtio_pci.force_legacy=1")
    found = functions(result)
    # Transitional ids and revision 0; the subsystem id is the device type.
    assert found["0x1001"][:3] == ["0x00", "0x0002", "virtio-pci"]
    assert found["0x1005"][:3] == ["0x00", "0x0004", "virtio-pci"]
    for pci_id in ("0x1001", "0x1005"):
        vectors = interrupts(result, pci_id, "PCI-MSI")
        assert sum(n for name, n in vectors.items() if not name.endswith("-config")) > 0, vectors
    assert used_legacy(servers) == [True, True]


@pytest.mark.normative(N_DISCOVERY_DEV, N_USED_NOTIFY_DEV, N_ISR_DEV)
@pytest.mark.normative(N_BLK_DEV_OP, N_ENTROPY_DEV)
def test_linux_legacy_driver_uses_intx_and_the_isr(pci_guest: Callable[..., Booted]) -> None:
    # No MSI in the guest: the legacy I/O BAR without the MSI-X fields, INTx and the ISR.
    result, servers = pci_guest("pci-transitional", "virtio_pci.force_legacy=1", "pci=nomsi")
    # Our slots 0x10 and 0x11 are pin A on GSI 20 and 21 of q35 (ICH9: PIRQ E-H).
    for pci_id, gsi in (("0x1001", "20"), ("0x1005", "21")):
        assert not interrupts(result, pci_id, "PCI-MSI")
        intx = interrupts(result, pci_id, "IO-APIC")
        assert list(intx) == [gsi] and intx[gsi] > 0, (pci_id, lines(result, "IRQ"))
    assert used_legacy(servers) == [True, True]
