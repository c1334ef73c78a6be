"""Real guests for pyvirtio's devices: Debian kernels under QEMU and User-Mode Linux.

``prepare()`` builds (once, cached) the guest assets from Debian packages;
``run_guest(script, vm="qemu"|"uml", disks=[VhostUserBlkDisk(socket)])`` boots a
guest attached to vhost-user back-ends, runs the shell script and returns its
console output and exit status. See docs/guest.md.
"""

from virtio.vm.assets import AssetError, GuestAssets, cache_dir, prepare
from virtio.vm.runner import (
    GuestResult,
    VhostUserBlkDisk,
    VhostUserDevice,
    VhostUserNic,
    qemu_command,
    run_guest,
    uml_command,
)

__all__ = [
    "AssetError",
    "GuestAssets",
    "GuestResult",
    "VhostUserBlkDisk",
    "VhostUserDevice",
    "VhostUserNic",
    "cache_dir",
    "prepare",
    "qemu_command",
    "run_guest",
    "uml_command",
]
