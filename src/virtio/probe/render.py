"""A probe's findings as aligned plain text (rich is not a dependency of pyvirtio)."""

from __future__ import annotations

from collections.abc import Mapping

from virtio.probe.reader import ConfigValue, Probe, Queue, feature_name


def ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1-3 7``."""
    out: list[str] = []
    start = prev = None
    for n in [*sorted(numbers), None]:
        if n is not None and prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None and prev is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    return " ".join(out)


def value_text(value: ConfigValue, display: str) -> str:
    if isinstance(value, list):
        return f"{len(value)}: {ranges(value)}" if value else "(empty)"
    if isinstance(value, str):
        return value if display == "mac" or display == "bytes" else repr(value)
    if display == "hex":
        return f"{value:#x}"
    return str(value)


def _queue_runs(queues: list[Queue]) -> list[tuple[str, int]]:
    runs: list[tuple[int, int, int]] = []  # first, last, size
    for q in queues:
        if runs and runs[-1][2] == q.max_size and runs[-1][1] == q.index - 1:
            runs[-1] = (runs[-1][0], q.index, q.max_size)
        else:
            runs.append((q.index, q.index, q.max_size))
    return [(str(a) if a == b else f"{a}-{b}", size) for a, b, size in runs]


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def text(result: Probe, qemu: Mapping[str, object]) -> str:
    lines: list[str] = []

    def row(label: str, value: str) -> None:
        lines.append(f"{label:<12}{value}")

    machine = qemu.get("machine", "")
    row("qemu", f"-device {qemu.get('device', '')}  (-M {machine})")
    for backend in _strings(qemu.get("backends")):
        row("", f"automatic back-end: {backend}")
    info = result.transport_info
    details = ", ".join(
        (k if v else f"not {k}") if isinstance(v, bool) else f"{k} {v}" for k, v in info.items()
    )
    row("transport", f"{result.transport}  ({details})" if details else result.transport)
    row("device", f"{result.device_id}  {result.device_type}")
    width = 64 if not result.transport.endswith("legacy") else 32
    row(
        "features",
        f"{result.device_features:#0{width // 4 + 2}x}  ({len(result.features)} offered)",
    )
    for bit in range(result.device_features.bit_length()):
        if result.device_features >> bit & 1:
            lines.append(f"  {bit:>3}  {feature_name(result.device_id, bit)}")
    row("config", result.config_struct or "-")
    if result.config:
        name_width = max(len(k) for k in result.config) + 2
        for name, value in result.config.items():
            shown = value_text(value, result.display.get(name, "dec"))
            lines.append(f"  {name:<{name_width}}{shown}")
    if result.config_absent:
        by_features: dict[str, list[str]] = {}
        for name, needs in result.config_absent.items():
            by_features.setdefault(" or ".join(needs), []).append(name)
        for features, names in by_features.items():
            lines.append(f"  not offered: {', '.join(names)}  ({features})")
    for note in result.config_notes:
        lines.append(f"  note: {note}")
    row("queues", str(len(result.queues)))
    for label, size in _queue_runs(result.queues):
        lines.append(f"  {label:<8}max_size {size}")
    row("reset", f"status {result.status_after_reset:#x} after the final reset")
    for complaint in _strings(qemu.get("guest_errors")):
        row("qemu said", complaint)
    return "\n".join(lines)
