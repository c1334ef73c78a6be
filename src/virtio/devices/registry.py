"""The device types pyvirtio knows, by name: the plug-in surface for device types.

Each package under ``virtio.devices`` declares one :class:`DeviceType` as
``DEVICE_TYPE`` in its ``__init__``; other distributions add theirs through
the ``pyvirtio.devices`` entry point group (an entry point naming a
:class:`DeviceType` object). ``virtio serve TYPE``, ``virtio bench`` and the
tests look types up here, so a new device type is one package and no edit
anywhere else.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from virtio.core.device import RingOptions, VirtioDevice
from virtio.core.driver import VirtioDriver

log = logging.getLogger("virtio.devices")


@dataclass(frozen=True)
class DeviceSettings:
    """What every device type takes from the common serve options."""

    ring: RingOptions = field(default_factory=RingOptions)
    queue_max_size: int = 256


@dataclass(frozen=True)
class DeviceType:
    """How to find, build and attach one device type."""

    name: str
    device_id: int
    summary: str
    device: type[VirtioDevice]
    driver: type[VirtioDriver]
    #: Adds the type's own ``virtio serve TYPE`` options.
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: Builds a device from parsed options; raises ValueError or OSError on bad input.
    from_arguments: Callable[[argparse.Namespace, DeviceSettings], VirtioDevice]
    #: A device with default settings, its scratch files under the given directory.
    example: Callable[[Path, DeviceSettings], VirtioDevice]
    #: QEMU's vhost-user device for this type (``vhost-user-blk-pci``), if it has one.
    qemu_vhost_user_device: str | None = None
    #: The number of queues a vhost-user front-end should ask for, from parsed options.
    num_queues: Callable[[argparse.Namespace], int] = lambda _args: 1
    #: ``module:function`` of the type's load generator (`virtio bench TYPE`), if any.
    bench: str | None = None
    #: One request of the type's own kind through a started driver, checked (raises on
    #: a wrong answer): what generic tests run over every transport.
    smoke: Callable[[VirtioDriver], None] | None = None
    #: QEMU options attaching a guest to a socket, for types QEMU attaches its own way
    #: (net: ``-netdev vhost-user``); arguments: the socket path and the device served.
    qemu_options: Callable[[str, VirtioDevice], str] | None = None
    #: Builds one device per ``--socket`` when a type serves several at once (net's
    #: switch ports); None: the type serves one socket.
    devices_for_sockets: (
        Callable[[argparse.Namespace, DeviceSettings, int], list[VirtioDevice]] | None
    ) = None

    def bench_main(self) -> Callable[[list[str]], int] | None:
        """The type's benchmark entry point, imported on demand."""
        if self.bench is None:
            return None
        module, _, name = self.bench.partition(":")
        main: Callable[[list[str]], int] = getattr(importlib.import_module(module), name)
        return main


@functools.cache
def device_types() -> dict[str, DeviceType]:
    """Every device type found, by name."""
    import virtio.devices as package

    found: dict[str, DeviceType] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"virtio.devices.{info.name}")
        kind = getattr(module, "DEVICE_TYPE", None)
        if isinstance(kind, DeviceType):
            found[kind.name] = kind
    for entry in metadata.entry_points(group="pyvirtio.devices"):
        try:
            kind = entry.load()
        except Exception as err:  # a broken plug-in must not break the built-in types
            log.warning("device type plug-in %s cannot be loaded: %s", entry.name, err)
            continue
        if isinstance(kind, DeviceType):
            found.setdefault(kind.name, kind)
        else:
            log.warning("plug-in %s is not a DeviceType", entry.name)
    return dict(sorted(found.items()))


def device_type(name: str) -> DeviceType:
    """The device type called ``name``; KeyError lists the known ones."""
    types = device_types()
    if name not in types:
        raise KeyError(f"unknown device type {name!r} (known: {', '.join(types)})")
    return types[name]


def by_device_id(device_id: int) -> DeviceType | None:
    return next((t for t in device_types().values() if t.device_id == device_id), None)
