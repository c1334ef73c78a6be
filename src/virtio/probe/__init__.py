"""`virtio probe`: any QEMU virtio device's transport, ids, features, configuration and queues.

:mod:`virtio.probe.reader` reads a device through any driver-side transport
(the spec's configuration layouts decode it); :mod:`virtio.probe.qemu`
starts QEMU under qtest with the device (and a back-end when it needs one);
:mod:`virtio.probe.cli` is the command.
"""

from virtio.probe.reader import Probe, ProbeFailed, ProbeTransport, Queue, probe

__all__ = ["Probe", "ProbeFailed", "ProbeTransport", "Queue", "probe"]
