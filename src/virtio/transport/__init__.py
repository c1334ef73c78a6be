"""Transports: how a driver and a device meet (loopback, vhost-user, PCI, MMIO)."""
