"""Probing QEMU's own virtio devices: checking the request, giving the device a back-end,
starting QEMU under qtest (:func:`virtio.vm.qtest.qemu_machine`) and finding the device.

Before QEMU starts, the device name is looked up in ``-device help`` (its
bus picks the machine: PCI devices go on ``q35``, virtio-bus ones on
``microvm`` behind virtio-mmio) and every property given is checked against
``-device NAME,help``: a typo is a one-line error at once, not a QEMU that
exits. Devices that cannot be realized without a back-end get one unless
the request names its own:

* ``drive`` (virtio-blk): a sparse raw image of ``disk_size`` bytes;
* ``fsdev`` (virtio-9p): a ``local`` export of an empty directory, tag ``probe``;
* ``cryptodev`` (virtio-crypto): ``cryptodev-backend-builtin``;
* ``memdev`` (virtio-mem, virtio-pmem): 128 MiB of RAM, and ``maxmem``/``slots``
  for the machine unless the extra arguments set ``-m``;
* ``guest-cid`` (vhost-vsock): 3.

vhost-user devices need a back-end process and virtio-input-host an evdev
node; those are asked for, not invented.
"""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from virtio.probe.reader import Probe, ProbeFailed, probe, transport_kind
from virtio.transport.mmio import MmioTransport
from virtio.transport.pci import CFG_BAR0, MODERN_BASE, CapType, PciTransport
from virtio.vm.qtest import QemuMachine, QtestError, QtestMmioBus, QtestPciBus, qemu_machine

QEMU = "qemu-system-x86_64"
MACHINES = ("q35", "pc", "microvm")
#: Properties every -device takes that ``-device NAME,help`` does not list.
GENERIC_PROPERTIES = frozenset({"driver", "id", "bus"})
MEMDEV_SIZE = "128M"


class ProbeError(Exception):
    """A one-line reason the probe cannot be done; ``code`` is the exit status (2: bad input)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DeviceModel:
    name: str
    bus: str | None
    properties: frozenset[str]


@dataclass
class Plan:
    """What QEMU is started with."""

    driver: str
    device: str  # the -device argument, automatic back-ends added
    machine: str
    extra: list[str]
    backends: list[str] = field(default_factory=list)

    @property
    def mmio(self) -> bool:
        return self.machine == "microvm"


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise ProbeError(f"{QEMU} is not installed (./dev setup)")
    return path


def _qemu_text(qemu: str, args: Sequence[str], timeout: float) -> str:
    try:
        done = subprocess.run(
            [qemu, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise ProbeError(f"`{QEMU} {' '.join(args)}` did not answer in {timeout}s") from None
    except OSError as err:
        raise ProbeError(f"cannot run {qemu}: {err}") from None
    return done.stdout + done.stderr


_NAME = re.compile(r'^name "([^"]+)"')
_BUS = re.compile(r", bus ([^,]+)")
_ALIAS = re.compile(r', alias "([^"]+)"')
_PROPERTY = re.compile(r"^\s+([A-Za-z0-9_.\-]+)=<")


def device_catalogue(qemu: str, timeout: float) -> dict[str, tuple[str, str | None]]:
    """Every device name and alias QEMU knows -> (device name, bus or None)."""
    found: dict[str, tuple[str, str | None]] = {}
    for line in _qemu_text(qemu, ["-device", "help"], timeout).splitlines():
        name = _NAME.match(line)
        if name is None:
            continue
        bus = _BUS.search(line)
        entry = (name.group(1), bus.group(1).strip() if bus else None)
        found[name.group(1)] = entry
        alias = _ALIAS.search(line)
        if alias:
            found.setdefault(alias.group(1), entry)
    return found


def split_options(text: str) -> list[str]:
    """QEMU's option syntax: comma-separated, a doubled comma is a comma in a value."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def _driver_and_keys(text: str) -> tuple[str, list[str]]:
    parts = split_options(text)
    if "=" not in parts[0]:
        driver, options = parts[0], parts[1:]
    else:
        drivers = [p.partition("=")[2] for p in parts if p.partition("=")[0] == "driver"]
        if not drivers:
            raise ProbeError(f"no device name in {text!r}", 2)
        driver, options = drivers[0], [p for p in parts if p.partition("=")[0] != "driver"]
    return driver.strip(), [p.partition("=")[0] for p in options if p]


def lookup(qemu: str, text: str, timeout: float) -> tuple[DeviceModel, list[str]]:
    """The device model a -device argument names, and the property names it sets."""
    driver, keys = _driver_and_keys(text)
    if not driver:
        raise ProbeError("no device name given (for example --qemu virtio-net-pci)", 2)
    catalogue = device_catalogue(qemu, timeout)
    if driver not in catalogue:
        close = difflib.get_close_matches(driver, list(catalogue), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ProbeError(f"QEMU has no device {driver!r}{hint}", 2)
    name, bus = catalogue[driver]
    properties: set[str] = set()
    for line in _qemu_text(qemu, ["-device", f"{name},help"], timeout).splitlines():
        match = _PROPERTY.match(line)
        if match:
            properties.add(match.group(1))
    model = DeviceModel(name, bus, frozenset(properties))
    known = properties | GENERIC_PROPERTIES
    for key in keys:
        if key in known or (key.startswith("no") and key[2:] in known):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ProbeError(
            f"{name} has no property {key!r}{hint}; see `{QEMU} -device {name},help`", 2
        )
    return model, keys


def choose_machine(model: DeviceModel, machine: str | None) -> str:
    bus = model.bus or ""
    pci = "PCI" in bus.upper()
    if bus != "virtio-bus" and not pci:
        where = f"the {bus} bus" if bus else "no bus"
        raise ProbeError(
            f"{model.name} sits on {where}: not a virtio device on PCI or virtio-mmio", 2
        )
    if machine is None:
        return "q35" if pci else "microvm"
    if machine == "microvm" and pci:
        raise ProbeError(
            f"{model.name} is a PCI device and microvm has no PCI bus here: "
            "use the -device variant (e.g. virtio-blk-device) or --machine q35",
            2,
        )
    if machine != "microvm" and not pci:
        raise ProbeError(
            f"{model.name} plugs into a virtio-mmio transport: use --machine microvm "
            "or the -pci variant",
            2,
        )
    return machine


def plan(
    text: str,
    *,
    machine: str | None,
    qemu_args: Sequence[str],
    workdir: Path,
    disk_size: int,
    qemu: str,
    timeout: float,
) -> Plan:
    """Check the request and add the back-ends the device needs."""
    model, keys = lookup(qemu, text, timeout)
    chosen = choose_machine(model, machine)
    props, given = model.properties, set(keys)
    device, extra, backends = text, list(qemu_args), []

    def missing(prop: str) -> bool:
        return prop in props and prop not in given

    if missing("chardev") and model.name.startswith("vhost-user"):
        raise ProbeError(
            f"{model.name} needs a vhost-user back-end: add chardev=ID to the device and "
            "--qemu-arg '-chardev socket,id=ID,path=SOCKET' (e.g. a `virtio serve` socket)",
            2,
        )
    if missing("evdev"):
        raise ProbeError(f"{model.name} needs evdev=/dev/input/eventN", 2)
    if missing("drive"):
        image = workdir / "probe-disk.img"
        with open(image, "wb") as f:
            f.truncate(disk_size)
        extra += ["-drive", f"if=none,id=probe-drive0,file={image},format=raw"]
        device += ",drive=probe-drive0"
        backends.append(f"drive: {disk_size} byte raw image")
    if missing("fsdev"):
        export = workdir / "probe-9p"
        export.mkdir()
        extra += ["-fsdev", f"local,id=probe-fs0,path={export},security_model=none"]
        device += ",fsdev=probe-fs0"
        backends.append("fsdev: local export of an empty directory")
        if missing("mount_tag"):
            device += ",mount_tag=probe"
    if missing("cryptodev"):
        extra += ["-object", "cryptodev-backend-builtin,id=probe-crypto0"]
        device += ",cryptodev=probe-crypto0"
        backends.append("cryptodev: cryptodev-backend-builtin")
    if missing("memdev"):
        extra += ["-object", f"memory-backend-ram,id=probe-mem0,size={MEMDEV_SIZE}"]
        device += ",memdev=probe-mem0"
        if "-m" not in qemu_args:
            extra += ["-m", "64M,slots=2,maxmem=1G"]
        backends.append(f"memdev: {MEMDEV_SIZE} memory-backend-ram")
    if missing("guest-cid"):
        device += ",guest-cid=3"
        backends.append("guest-cid: 3")
    return Plan(model.name, device, chosen, extra, backends)


def _qemu_message(err: QtestError, timeout: float) -> str:
    text = str(err)
    said = text.partition("QEMU said:")[2]
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    if lines:
        return "QEMU exited: " + lines[-1].removeprefix(f"{QEMU}: ")
    if text.startswith("no qtest socket"):
        return f"QEMU did not start within {timeout}s"
    return f"QEMU stopped answering: {text}"


MICROVM = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=off,ioapic2=off,acpi=off"
#: QMP input for a dry run: once the main loop runs (every device realized), ask and quit.
_QMP_QUIT = '{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n{"execute":"quit"}\n'


def dry_run(plan: Plan, qemu: str, timeout: float) -> str | None:
    """Start QEMU with the same devices, paused and without qtest, and quit over QMP as soon
    as it runs. None if it got that far; otherwise its (last) line of complaint.

    QEMU that exits while starting would otherwise only show as a qtest socket that never
    appears (:func:`~virtio.vm.qtest.qemu_machine` waits its whole timeout for it); this costs
    one QEMU start (about 50 ms) and names the problem at once.
    """
    machine = MICROVM if plan.mmio else plan.machine
    cmd = [qemu, "-M", machine, "-accel", "tcg", "-m", "64M", "-nodefaults", "-S"]
    cmd += ["-display", "none", "-monitor", "none", "-serial", "none", "-qmp", "stdio"]
    cmd += ["-device", plan.device, *plan.extra]
    try:
        done = subprocess.run(cmd, input=_QMP_QUIT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"QEMU did not get to run its main loop within {timeout}s"
    except OSError as err:
        return f"cannot run {qemu}: {err}"
    if done.returncode == 0 and '"status"' in done.stdout:
        return None
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": warning:" not in line] or lines
    why = errors[-1].removeprefix(f"{QEMU}: ") if errors else f"exit status {done.returncode}"
    return why


def _transport_info(transport: PciTransport | MmioTransport) -> dict[str, object]:
    if isinstance(transport, PciTransport):
        caps = transport.caps
        modern = all(t in caps for t in (CapType.COMMON, CapType.NOTIFY, CapType.ISR))
        legacy_bar = transport.pci_device_id < MODERN_BASE and bool(
            transport.bus.config_read(CFG_BAR0, 4) & 1
        )
        interfaces = [name for name, has in (("modern", modern), ("legacy", legacy_bar)) if has]
        info: dict[str, object] = {
            "pci_id": f"1af4:{transport.pci_device_id:04x}",
            "revision": transport.revision,
            "interfaces": "+".join(interfaces),
        }
        if isinstance(transport.bus, QtestPciBus):
            info["slot"] = transport.bus.slot
        return info
    info = {
        "version": transport.version,
        "interfaces": "legacy" if transport.legacy else "modern",
        "vendor_id": f"{transport.vendor_id:#010x}",
    }
    if isinstance(transport.bus, QtestMmioBus):
        info["base"] = f"{transport.bus.base:#x}"
    return info


def _find(machine: QemuMachine, plan: Plan, legacy: bool) -> PciTransport | MmioTransport:
    transports: Sequence[PciTransport | MmioTransport]
    if plan.mmio:
        transports = machine.mmio_transports()
    else:
        transports = machine.pci_transports(use_msix=False, force_legacy=legacy)
        if not transports and legacy and machine.pci_transports(use_msix=False):
            raise ProbeError(f"{plan.driver} has no legacy interface (it is modern-only)", 2)
    if not transports:
        where = "virtio-mmio window" if plan.mmio else "virtio PCI function"
        raise ProbeError(f"{plan.driver} is not a virtio device: QEMU shows no {where}", 2)
    return transports[0]


def run(plan: Plan, *, legacy: bool, timeout: float) -> tuple[Probe, dict[str, object]]:
    """Check QEMU starts with the device, start it under qtest, probe the device, stop QEMU."""
    qemu = qemu_binary()
    why = dry_run(plan, qemu, timeout)
    if why is not None:
        raise ProbeError(f"QEMU exited: {why}")
    try:
        with qemu_machine(
            [plan.device],
            machine=plan.machine,
            modern=not (legacy and plan.mmio),
            extra=plan.extra,
            timeout=timeout,
        ) as machine:
            transport = _find(machine, plan, legacy)
            result = probe(transport, kind=transport_kind(transport, mmio=plan.mmio))
            result.transport_info = _transport_info(transport)
            complaints = [
                line for line in machine.guest_error_text().splitlines() if "virtio" in line.lower()
            ]
    except QtestError as err:
        raise ProbeError(_qemu_message(err, timeout)) from None
    except OSError as err:
        # The qtest connection broke: QEMU went away.
        raise ProbeError(f"QEMU went away: {err}") from None
    except ProbeFailed as err:
        raise ProbeError(str(err)) from None
    info: dict[str, object] = {
        "device": plan.device,
        "machine": plan.machine,
        "backends": list(plan.backends),
        "extra_args": list(plan.extra),
    }
    if complaints:
        info["guest_errors"] = complaints
    return result, info
