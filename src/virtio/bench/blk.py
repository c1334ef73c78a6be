"""`virtio bench blk`: a fio-like load generator on the pyvirtio blk driver.

It drives a block device through any transport: a vhost-user back-end
(``--connect SOCK``: QEMU's qemu-storage-daemon, ``virtio serve blk``, ...),
an image file served in process (``--loopback IMAGE``), or QEMU's own
virtio-blk-pci reached register by register through qtest (``--qemu-pci IMAGE``). Options follow fio's
names. Each queue keeps ``--iodepth`` requests in flight with buffers
allocated once; a kick covers a whole batch and notifications are
suppressed while the loop polls.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from virtio.core.driver import DriverTransport
from virtio.devices.blk import BlkDevice, BlkDriver, BlkOptions
from virtio.devices.blk.wire import BLK_REQ_HEADER, S_OK, SECTOR_SIZE, T_IN, T_OUT
from virtio.errors import VirtioError
from virtio.memory import Memory

RW_MODES = ("read", "write", "randread", "randwrite", "readwrite", "randrw")
_HDR = BLK_REQ_HEADER.struct
_TAG_BYTES = 16


def parse_size(text: str) -> int:
    """fio-style sizes: 4k, 1M, 2g, 512 (bytes)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


@dataclass
class JobSpec:
    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 1
    num_queues: int = 1
    runtime: float | None = 5.0
    size: int | None = None  # bytes of the device to use; None: all of it
    total: int | None = None  # stop after this many bytes moved
    rwmixread: int = 50
    verify: bool = False
    seed: int = 1
    spin_us: float = 50.0


@dataclass
class Result:
    ios: int = 0
    bytes: int = 0
    errors: int = 0
    seconds: float = 0.0
    reads: int = 0
    writes: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    verify_failures: int = 0

    def percentile(self, p: float) -> float:
        if not self.latencies_ns:
            return 0.0
        ordered = sorted(self.latencies_ns)
        k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
        return ordered[k] / 1000.0

    def summary(self) -> dict[str, object]:
        lat = self.latencies_ns
        return {
            "iops": round(self.ios / self.seconds, 1) if self.seconds else 0.0,
            "bw_bytes_per_s": round(self.bytes / self.seconds) if self.seconds else 0,
            "lat_us": {
                "mean": round(sum(lat) / len(lat) / 1000.0, 2) if lat else 0.0,
                "p50": round(self.percentile(50), 2),
                "p99": round(self.percentile(99), 2),
                "p99.9": round(self.percentile(99.9), 2),
            },
            "ios": self.ios,
            "reads": self.reads,
            "writes": self.writes,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "errors": self.errors,
            "verify_failures": self.verify_failures,
        }


def pattern(lba: int, tag: int, nbytes: int) -> bytes:
    """Verifiable block contents: each sector starts with (lba, tag), then repeats tag."""
    out = bytearray()
    for i in range(nbytes // SECTOR_SIZE):
        sector = lba + i
        head = sector.to_bytes(8, "little") + tag.to_bytes(8, "little")
        out += head + tag.to_bytes(8, "little") * ((SECTOR_SIZE - _TAG_BYTES) // 8)
    return bytes(out)


class _Slot:
    """One in-flight request's guest buffers, reused for the whole run."""

    __slots__ = (
        "data",
        "header",
        "header_view",
        "is_write",
        "lba",
        "queue",
        "started",
        "status",
        "status_view",
        "tag",
    )

    def __init__(self, queue: int, header: int, data: int, status: int, memory: Memory) -> None:
        self.queue = queue
        self.header = header
        self.data = data
        self.status = status
        # Views made once: the hot loop writes headers and reads status in place.
        self.header_view = memory.view(header, 16)
        self.status_view = memory.view(status, 1)
        self.is_write = False
        self.lba = 0
        self.started = 0
        self.tag = 0


class LoadGenerator:
    def __init__(
        self,
        driver: BlkDriver,
        spec: JobSpec,
        progress: Callable[[Result, float], None] | None = None,
    ) -> None:
        self.driver = driver
        self.spec = spec
        self.progress = progress
        t = driver.transport
        self.memory = t.memory
        self.capacity_bytes = driver.capacity * SECTOR_SIZE
        region = spec.size or self.capacity_bytes
        if region > self.capacity_bytes:
            raise ValueError(f"--size {region} exceeds the device ({self.capacity_bytes} bytes)")
        if spec.bs % SECTOR_SIZE:
            raise ValueError("--bs must be a multiple of 512")
        self.blocks = region // spec.bs
        if self.blocks == 0:
            raise ValueError("--size is smaller than one block")
        if spec.num_queues > len(driver.queues):
            raise ValueError(f"--num-queues {spec.num_queues}: device has {len(driver.queues)}")
        self.rng = random.Random(spec.seed)
        # Seconds to poll for completions before sleeping on an interrupt.
        self.spin = spec.spin_us / 1e6
        self.seq_next = 0
        self.written: dict[int, int] = {}  # lba -> tag of the last completed write
        self.slots: list[_Slot] = []
        alloc = t.allocator
        for q in range(spec.num_queues):
            for _ in range(spec.iodepth):
                self.slots.append(
                    _Slot(
                        q,
                        alloc.alloc(16, 16),
                        alloc.alloc(spec.bs, 4096),
                        alloc.alloc(1, 1),
                        self.memory,
                    )
                )
        # Direct descriptors when the ring has room for every request: no indirect
        # table to allocate per request.
        offsets = []
        off = 0
        for n in driver.segment_sizes(spec.bs):
            offsets.append((off, n))
            off += n
        self.pieces = offsets  # the data buffer's segments, within size_max
        per_request = len(offsets) + 2
        self.indirect = spec.iodepth * per_request > min(q.size for q in driver.queues)
        self.busy: set[int] = set()  # LBAs with a request in flight

    def _next_op(self) -> tuple[bool, int]:
        spec = self.spec
        rw = spec.rw
        if rw in ("read", "write", "readwrite"):
            block = self.seq_next
            self.seq_next = (self.seq_next + 1) % self.blocks
        else:
            block = self.rng.randrange(self.blocks)
        if rw in ("write", "randwrite"):
            is_write = True
        elif rw in ("read", "randread"):
            is_write = False
        else:
            is_write = self.rng.randrange(100) >= spec.rwmixread
        return is_write, block * (spec.bs // SECTOR_SIZE)

    def _post(self, slot: _Slot) -> None:
        # Never two requests on one block at once: their order is undefined, and
        # verification could not say which data is right.
        for _ in range(64):
            is_write, lba = self._next_op()
            if lba not in self.busy:
                break
        else:
            raise ValueError("--size is too small for --iodepth: blocks are all busy")
        self.busy.add(lba)
        if self.spec.verify and not is_write and lba not in self.written:
            is_write = True  # only read back what this run wrote
        slot.is_write = is_write
        slot.lba = lba
        mem = self.memory
        bs = self.spec.bs
        data_segs = [(slot.data + off, n) for off, n in self.pieces]
        if is_write:
            _HDR.pack_into(slot.header_view, 0, T_OUT, 0, lba)
            if self.spec.verify:
                slot.tag = self.rng.getrandbits(63) | 1
                mem.write(slot.data, pattern(lba, slot.tag, bs))
            segs_out = [(slot.header, 16), *data_segs]
            segs_in = [(slot.status, 1)]
        else:
            _HDR.pack_into(slot.header_view, 0, T_IN, 0, lba)
            segs_out = [(slot.header, 16)]
            segs_in = [*data_segs, (slot.status, 1)]
        slot.status_view[0] = 0xFF
        slot.started = time.perf_counter_ns()
        self.driver.queues[slot.queue].add(segs_out, segs_in, slot, use_indirect=self.indirect)

    def _complete(self, slot: _Slot, result: Result) -> None:
        now = time.perf_counter_ns()
        self.busy.discard(slot.lba)
        result.latencies_ns.append(now - slot.started)
        status = slot.status_view[0]
        if status != S_OK:
            result.errors += 1
        bs = self.spec.bs
        if slot.is_write:
            result.writes += 1
            if status == S_OK and self.spec.verify:
                self.written[slot.lba] = slot.tag
        else:
            result.reads += 1
            tag = self.written.get(slot.lba)
            if (
                self.spec.verify
                and tag is not None
                and status == S_OK
                and self.memory.read(slot.data, bs) != pattern(slot.lba, tag, bs)
            ):
                result.verify_failures += 1
        result.ios += 1
        result.bytes += bs

    def run(self) -> Result:
        spec = self.spec
        driver = self.driver
        result = Result()
        queues = range(spec.num_queues)
        for slot in self.slots:
            self._post(slot)
        for q in queues:
            driver.queues[q].disable_interrupts()
            driver.kick(q)
        start = time.perf_counter()
        deadline = start + spec.runtime if spec.runtime else None
        last_report = start
        stopping = False
        outstanding = len(self.slots)
        while outstanding:
            progressed = False
            for q in queues:
                done = driver.queues[q].get_used()
                if not done:
                    continue
                progressed = True
                for token, _written in done:
                    assert isinstance(token, _Slot)
                    slot = token
                    self._complete(slot, result)
                    outstanding -= 1
                    if not stopping:
                        self._post(slot)
                        outstanding += 1
                driver.kick(q)
            now = time.perf_counter()
            if not stopping and (
                (deadline is not None and now >= deadline)
                or (spec.total is not None and result.bytes >= spec.total)
            ):
                stopping = True
            if self.progress and now - last_report >= 0.5:
                last_report = now
                self.progress(result, now - start)
            if not progressed:
                # Nothing done yet: poll the used rings for a moment (a completion
                # is often microseconds away), then sleep on the notification.
                spin_until = time.perf_counter() + self.spin
                while time.perf_counter() < spin_until:
                    if any(driver.queues[q].has_used() for q in queues):
                        break
                else:
                    for q in queues:
                        if driver.queues[q].enable_interrupts():
                            break
                    else:
                        driver.transport.wait_interrupt(0.05)
                    for q in queues:
                        driver.queues[q].disable_interrupts()
                driver._check_usable()
        result.seconds = time.perf_counter() - start
        return result


@contextmanager
def loopback_transport(image: str, num_queues: int, queue_size: int) -> Iterator[DriverTransport]:
    from virtio.transport.loopback import Loopback

    device = BlkDevice(image, BlkOptions(num_queues=num_queues), queue_max_size=queue_size)
    try:
        with Loopback(device, memory_size=256 << 20) as lb:
            yield lb
    finally:
        device.close()


@contextmanager
def vhost_user_transport(path: str, num_queues: int) -> Iterator[DriverTransport]:
    """A vhost-user front-end connected to the back-end at ``path``."""
    from virtio.vhost_user.frontend import connect_blk

    with connect_blk(path, num_queues=num_queues) as transport:
        yield transport


@contextmanager
def qemu_pci_transport(image: str, num_queues: int) -> Iterator[DriverTransport]:
    """QEMU's own virtio-blk-pci on ``image``, driven through qtest (no guest runs)."""
    from virtio.vm.qtest import qemu_machine

    device = f"virtio-blk-pci,drive=d0,disable-legacy=on,num-queues={num_queues}"
    drive = ["-drive", f"if=none,id=d0,file={image},format=raw,cache=none,aio=native"]
    with qemu_machine([device], machine="q35", memory_mb=256, extra=drive) as machine:
        transports = machine.pci_transports()
        if not transports:
            raise VirtioError("QEMU's virtio-blk-pci was not found on the bus")
        yield transports[0]


def _print_progress(result: Result, elapsed: float) -> None:
    iops = result.ios / elapsed if elapsed else 0
    mbs = result.bytes / elapsed / 1e6 if elapsed else 0
    print(
        f"\r[{elapsed:6.1f}s] {iops:10,.0f} IOPS  {mbs:9.1f} MB/s  errors {result.errors}",
        end="",
        file=sys.stderr,
        flush=True,
    )


def print_table(summary: dict[str, object]) -> None:
    lat = summary["lat_us"]
    assert isinstance(lat, dict)
    rows = [
        ("IOPS", f"{summary['iops']:,}"),
        ("bandwidth", f"{int(str(summary['bw_bytes_per_s'])) / 1e6:,.1f} MB/s"),
        ("latency mean", f"{lat['mean']} us"),
        ("latency p50", f"{lat['p50']} us"),
        ("latency p99", f"{lat['p99']} us"),
        ("latency p99.9", f"{lat['p99.9']} us"),
        ("I/Os (reads/writes)", f"{summary['ios']} ({summary['reads']}/{summary['writes']})"),
        ("errors", str(summary["errors"])),
        ("verify failures", str(summary["verify_failures"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virtio bench blk", description=__doc__)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--connect", metavar="SOCK", help="vhost-user-blk back-end socket")
    target.add_argument("--loopback", metavar="IMAGE", help="serve IMAGE in process")
    target.add_argument(
        "--qemu-pci",
        metavar="IMAGE",
        help="QEMU's virtio-blk-pci on IMAGE, reached through qtest",
    )
    p.add_argument("--rw", choices=RW_MODES, default="randread")
    p.add_argument("--bs", type=parse_size, default=4096, help="block size (default 4k)")
    p.add_argument("--iodepth", type=int, default=1, help="requests in flight per queue")
    p.add_argument("--numjobs", "--num-queues", dest="num_queues", type=int, default=1)
    p.add_argument("--runtime", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--size", type=parse_size, default=None, help="bytes of the disk to use")
    p.add_argument(
        "--io-size",
        dest="total",
        type=parse_size,
        default=None,
        help="stop after moving this many bytes",
    )
    p.add_argument("--rwmixread", type=int, default=50, help="read %% for readwrite/randrw")
    p.add_argument("--verify", action="store_true", help="write a checked pattern, read it back")
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iodepth < 1 or args.num_queues < 1 or args.runtime <= 0:
        parser.error("--iodepth, --numjobs and --runtime must be positive")
    if not 0 <= args.rwmixread <= 100:
        parser.error("--rwmixread is a percentage")
    spec = JobSpec(
        rw=args.rw,
        bs=args.bs,
        iodepth=args.iodepth,
        num_queues=args.num_queues,
        runtime=args.runtime,
        size=args.size,
        total=args.total,
        rwmixread=args.rwmixread,
        verify=args.verify,
    )
    try:
        with ExitStack() as stack:
            image = args.loopback or args.qemu_pci
            if image and not os.path.exists(image):
                parser.error(f"no such image: {image}")
            if args.loopback:
                transport = stack.enter_context(
                    loopback_transport(args.loopback, args.num_queues, args.queue_size)
                )
            elif args.qemu_pci:
                transport = stack.enter_context(qemu_pci_transport(image, args.num_queues))
            else:
                transport = stack.enter_context(vhost_user_transport(args.connect, args.num_queues))
            driver = BlkDriver(transport, queue_size=args.queue_size)
            driver.initialize()
            if spec.verify and spec.rw in ("read", "randread"):
                spec.rw = "randrw"  # verification needs writes to compare against
            gen = LoadGenerator(
                driver,
                spec,
                None if args.json or not sys.stderr.isatty() else _print_progress,
            )
            result = gen.run()
            if gen.progress:
                print(file=sys.stderr)
            driver.reset()
    except (VirtioError, OSError, ValueError, TimeoutError) as err:
        print(f"virtio bench blk: {err}", file=sys.stderr)
        return 1
    summary = result.summary()
    summary.update(
        {"rw": spec.rw, "bs": spec.bs, "iodepth": spec.iodepth, "num_queues": spec.num_queues}
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary)
    return 0 if not result.errors and not result.verify_failures else 1
