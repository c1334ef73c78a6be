"""QEMU's multi-process device proxy (``x-pci-proxy-dev``): pyvirtio's PCI functions in a VM.

QEMU forwards every configuration-space and BAR access of a proxy PCI
function over a Unix stream socket and shares guest RAM as memfds; this
package answers it with a :class:`~virtio.transport.pci.PciFunction`:

- :mod:`~virtio.mpqemu.wire`: the messages (sans-IO codec);
- :mod:`~virtio.mpqemu.remote`: a session over one function (sans-IO);
- :mod:`~virtio.mpqemu.control`: the side channel to ``virtio qemu``, which
  carries the function's interrupts into the VM through QEMU's qtest socket;
- :mod:`~virtio.mpqemu.server`: ``virtio serve TYPE --transport pci``;
- :mod:`~virtio.mpqemu.launcher`: ``virtio qemu --pci PATH -- qemu ...``.
"""
