"""The spec as tables: device ids, feature bits, status bits, normative blocks."""

from virtio.spec.device_ids import DeviceId
from virtio.spec.status import DeviceStatus

__all__ = ["DeviceId", "DeviceStatus"]
