"""Lazy access to the spec data copied into the package (data/*.json)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any


@functools.cache
def load(name: str) -> Any:
    with resources.files("virtio.spec").joinpath("data", name).open("rb") as f:
        return json.load(f)


def device_ids_table() -> list[dict[str, Any]]:
    return list(load("device-ids.json")["device_ids"])


def features_table() -> list[dict[str, Any]]:
    return list(load("features.json")["features"])


def normative_blocks() -> list[dict[str, Any]]:
    return list(load("normative.json")["blocks"])
