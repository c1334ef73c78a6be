"""The side channel between ``virtio serve --transport pci`` and ``virtio qemu``.

Under TCG, QEMU never connects the proxy's interrupt eventfds (that takes
KVM's irqfd), so a function's interrupts travel as lines on this channel to
``virtio qemu``, which owns the VM's qtest socket and injects them: an MSI-X
message as the 4-byte memory write it is, INTx as the I/O APIC input level.

    launcher -> server   pyvirtio-pci-proxy 1
    server -> launcher   {"device": "blk", "pci_id": "1af4:1042", ...}  + the proxy's socket fd
    server -> launcher   msi 0xfee01004 0x4025
    server -> launcher   intx 1 11           (level, the Interrupt Line firmware wrote)

Once the launcher has the fd it gives it to QEMU (``x-pci-proxy-dev,fd=N``);
the session lasts as long as this channel.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from virtio.errors import VirtioError

HELLO = b"pyvirtio-pci-proxy 1\n"
#: The longest line either side sends (a description is far shorter).
MAX_LINE = 4096


class ControlError(VirtioError):
    """A line on the side channel that is not one of its messages."""


@dataclass(frozen=True)
class FunctionInfo:
    """What the server tells the launcher about its PCI function."""

    device: str
    pci_id: str
    transitional: bool
    msix_vectors: int

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> FunctionInfo:
        try:
            fields = json.loads(line)
            return cls(
                device=str(fields["device"]),
                pci_id=str(fields["pci_id"]),
                transitional=bool(fields["transitional"]),
                msix_vectors=int(fields["msix_vectors"]),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ControlError(f"not a PCI function description: {line[:80]!r}") from err


@dataclass(frozen=True)
class Msi:
    address: int
    data: int


@dataclass(frozen=True)
class Intx:
    level: bool
    line: int  # the Interrupt Line register (the IRQ firmware routed INTA# to)


def encode_msi(address: int, data: int) -> bytes:
    return f"msi {address:#x} {data:#x}\n".encode()


def encode_intx(level: bool, line: int) -> bytes:
    return f"intx {int(level)} {line}\n".encode()


def decode_event(line: bytes) -> Msi | Intx:
    words = line.split()
    try:
        if len(words) == 3 and words[0] == b"msi":
            address, data = int(words[1], 0), int(words[2], 0)
            if 0 <= address < 1 << 64 and 0 <= data < 1 << 32:
                return Msi(address, data)
        elif len(words) == 3 and words[0] == b"intx" and words[1] in (b"0", b"1"):
            irq = int(words[2])
            if 0 <= irq <= 255:
                return Intx(words[1] == b"1", irq)
    except ValueError:
        pass
    raise ControlError(f"not an interrupt message: {line[:80]!r}")
