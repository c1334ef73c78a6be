"""virtio-net, the network device (device id 1): wire format, device model, driver, host sides."""

from virtio.devices.net import options as _options
from virtio.devices.net.device import NetDevice
from virtio.devices.net.driver import NetDriver
from virtio.devices.registry import DeviceType
from virtio.spec.device_ids import DeviceId

DEVICE_TYPE = DeviceType(
    name="net",
    device_id=DeviceId.NET,
    summary="a network interface (TAP, built-in switch or sink)",
    device=NetDevice,
    driver=NetDriver,
    add_arguments=_options.add_arguments,
    from_arguments=_options.from_arguments,
    example=_options.example,
    qemu_vhost_user_device="virtio-net-pci",
    num_queues=_options.num_queues,
    qemu_options=_options.qemu_options,
    bench="virtio.bench.net:main",
    devices_for_sockets=_options.devices_for_sockets,
)

__all__ = ["DEVICE_TYPE", "NetDevice", "NetDriver"]
