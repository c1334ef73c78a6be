"""Feature bits: one constant per bit, named as in the spec, and their rules.

The constants and the parsed "Requires ..." rules are generated from the spec
data (``scripts/gen-spec-tables``); the lookups here answer what a device may
offer and a driver may accept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from virtio.spec._feature_table import *  # noqa: F403  (the generated constants)
from virtio.spec._feature_table import TABLE

# Bits 24..40 and 43 are reserved for the queue and feature negotiation mechanisms.
CORE_FEATURE_BITS = frozenset([*range(24, 41), 43])
#: 32-bit feature words a modern interface carries (bits 0..127; net's
#: VIRTIO_NET_F_RSS_CONTEXT is bit 64). vhost-user moves 64 bits only.
FEATURE_WORDS = 4


@dataclass(frozen=True)
class FeatureInfo:
    name: str
    bit: int
    device_id: int | None  # None: a core (device-independent) feature
    legacy: bool
    #: All groups must be satisfied; a group is satisfied by any one of its names.
    requires: tuple[tuple[str, ...], ...]


ALL_FEATURES: tuple[FeatureInfo, ...] = tuple(FeatureInfo(*row) for row in TABLE)


@functools.cache
def features_for(device_id: int, *, include_legacy: bool = False) -> list[FeatureInfo]:
    """The features a device of this type can have: its own, plus the core ones."""
    return [
        f
        for f in ALL_FEATURES
        if f.device_id in (device_id, None) and (include_legacy or not f.legacy)
    ]


@functools.cache
def _by_bit(device_id: int) -> dict[int, FeatureInfo]:
    out: dict[int, FeatureInfo] = {}
    for f in features_for(device_id, include_legacy=True):
        # A non-legacy meaning wins over a legacy one sharing the bit.
        if f.bit not in out or out[f.bit].legacy:
            out[f.bit] = f
    return out


@functools.cache
def _by_name(device_id: int) -> dict[str, FeatureInfo]:
    return {f.name: f for f in features_for(device_id, include_legacy=True)}


def feature_name(device_id: int, bit: int) -> str:
    info = _by_bit(device_id).get(bit)
    return info.name if info else f"bit {bit}"


def describe(device_id: int, features: int) -> list[str]:
    """Names of the set bits, lowest first."""
    return [
        feature_name(device_id, bit) for bit in range(features.bit_length()) if features >> bit & 1
    ]


def unmet_requirements(device_id: int, features: int) -> list[str]:
    """One message per set feature whose required features are not set too."""
    names = _by_name(device_id)
    problems = []
    for bit in range(features.bit_length()):
        if not features >> bit & 1:
            continue
        info = _by_bit(device_id).get(bit)
        if info is None:
            continue
        for group in info.requires:
            if not any(n in names and features >> names[n].bit & 1 for n in group):
                problems.append(f"{info.name} requires {' or '.join(group)}")
    return problems
