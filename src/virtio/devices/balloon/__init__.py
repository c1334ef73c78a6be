"""virtio-balloon, the traditional memory balloon (device id 5): device model and driver."""

from virtio.devices.balloon import options as _options
from virtio.devices.balloon.device import BalloonDevice
from virtio.devices.balloon.driver import BalloonDriver
from virtio.devices.registry import DeviceType
from virtio.spec.device_ids import DeviceId

DEVICE_TYPE = DeviceType(
    name="balloon",
    device_id=DeviceId.BALLOON,
    summary="a traditional memory balloon (target set through a control socket)",
    device=BalloonDevice,
    driver=BalloonDriver,
    add_arguments=_options.add_arguments,
    from_arguments=_options.from_arguments,
    example=_options.example,
    num_queues=_options.num_queues,
)

__all__ = ["DEVICE_TYPE", "BalloonDevice", "BalloonDriver"]
