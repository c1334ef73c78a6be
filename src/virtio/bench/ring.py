"""`virtio bench ring`: device-side ring throughput and loopback blk requests.

The device-side figures time only the device's pop and push calls: the
driver side re-publishes the same descriptors between batches (as a driver
reusing its buffers would) and is not counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from virtio.devices.blk import BlkDevice, BlkDriver, BlkOptions
from virtio.devices.blk.wire import BLK_REQ_HEADER, SECTOR_SIZE, T_IN
from virtio.memory import Allocator, GuestMemory
from virtio.queue import DeviceQueue, DriverQueue, RingLayout, device_queue, driver_queue
from virtio.transport.loopback import Loopback


def _chains_per_s(
    driver: DriverQueue,
    device: DeviceQueue,
    buffers: list[list[tuple[int, int]]],
    readable: int,
    seconds: float,
) -> float:
    """Device-side pops and pushes a second; the driver re-adds each chain between batches
    (its first ``readable`` segments device-readable) and is not timed."""
    for segs in buffers:
        driver.add(segs[:readable], segs[readable:], segs)
    done = 0
    spent = 0.0
    clock = time.perf_counter
    pop_many = device.pop_many
    push_many = device.push_many
    size = device.size
    deadline = clock() + seconds
    while clock() < deadline:
        t0 = clock()
        chains = pop_many(size)
        push_many([(c, 0) for c in chains])
        spent += clock() - t0
        done += len(chains)
        for token, _ in driver.get_used():
            assert isinstance(token, list)
            driver.add(token[:readable], token[readable:], token)
    return done / spent


def device_chains_per_s(packed: bool, ndesc: int, seconds: float, size: int = 256) -> float:
    memory = GuestMemory()
    memory.add(0, bytearray(16 << 20))
    layout = RingLayout.contiguous(0x1000, size, packed)
    alloc = Allocator(0x100000, 8 << 20)
    driver = driver_queue(memory, layout, allocator=alloc)
    device = device_queue(memory, layout)
    buffers = [[(alloc.alloc(512), 512) for _ in range(ndesc)] for _ in range(size // ndesc)]
    return _chains_per_s(driver, device, buffers, 1, seconds)


def indirect_chains_per_s(contiguous: bool, seconds: float, ndesc: int = 128) -> float:
    """Split ring, one indirect table of ``ndesc`` 4 KiB descriptors a chain (a large read:
    two readable, the rest writable), on pages that follow each other or not."""
    memory = GuestMemory()
    memory.add(0, bytearray(64 << 20))
    layout = RingLayout.contiguous(0x1000, 256, False)
    alloc = Allocator(0x100000, 60 << 20)
    driver = driver_queue(memory, layout, allocator=alloc, indirect=True)
    device = device_queue(memory, layout, indirect=True)
    stride = 4096 if contiguous else 8192  # a gap after each page: nothing to merge
    buffers = []
    for _ in range(8):
        base = alloc.alloc(stride * ndesc)
        buffers.append([(base + stride * i, 4096) for i in range(ndesc)])
    return _chains_per_s(driver, device, buffers, 2, seconds)


def loopback_blk_requests_per_s(block: int, seconds: float, depth: int = 32) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.img")
        size = 256 << 20
        with open(path, "wb") as f:
            f.truncate(size)
        device = BlkDevice(path, BlkOptions())
        try:
            with Loopback(device, memory_size=128 << 20) as lb:
                driver = BlkDriver(lb, queue_size=256)
                driver.initialize()
                q = driver.queues[0]
                alloc = lb.allocator
                header = alloc.alloc(16 * depth)
                data = [alloc.alloc(block, 4096) for _ in range(depth)]
                status = alloc.alloc(depth)
                sectors = size // SECTOR_SIZE - block // SECTOR_SIZE
                hdr = BLK_REQ_HEADER.struct
                rng = 0x12345

                def post(i: int) -> None:
                    nonlocal rng
                    rng = (rng * 1103515245 + 12345) & 0x7FFFFFFF
                    sector = (rng % sectors) & ~7
                    lb.memory.write(header + 16 * i, hdr.pack(T_IN, 0, sector))
                    q.add([(header + 16 * i, 16)], [(data[i], block), (status + i, 1)], i)

                for i in range(depth):
                    post(i)
                done = 0
                clock = time.perf_counter
                start = clock()
                deadline = start + seconds
                while clock() < deadline:
                    driver.kick(0)
                    for token, _ in q.get_used():
                        assert isinstance(token, int)
                        done += 1
                        post(token)
                return done / (clock() - start)
        finally:
            device.close()


def c_peer(seconds: float) -> dict[str, float] | None:
    """Build and run the native reference loop (bench/c/ring_peer.c); None without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = resources.files("virtio.bench").joinpath("c", "ring_peer.c")
    cache = Path(os.environ.get("PYVIRTIO_CACHE", Path.home() / ".cache" / "pyvirtio")) / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    text = source.read_bytes()
    binary = cache / f"ring_peer-{hashlib.sha256(text).hexdigest()[:12]}"
    if not binary.exists():
        src = cache / "ring_peer.c"
        src.write_bytes(text)
        built = subprocess.run(
            [compiler, "-O2", "-o", str(binary), str(src)], capture_output=True, text=True
        )
        if built.returncode != 0:
            print(f"note: could not build the C peer: {built.stderr.strip()}", file=sys.stderr)
            return None
    out = subprocess.run(
        [str(binary), str(seconds)], capture_output=True, text=True, timeout=60 + 8 * seconds
    )
    if out.returncode != 0:
        return None
    data = json.loads(out.stdout)
    return {str(k): float(v) for k, v in data.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="virtio bench ring", description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="per figure (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    results: dict[str, object] = {}
    for packed in (False, True):
        for ndesc in (1, 3):
            key = f"{'packed' if packed else 'split'}_{ndesc}desc_chains_per_s"
            results[key] = round(device_chains_per_s(packed, ndesc, args.seconds))
    for contiguous in (True, False):
        key = f"split_128desc_indirect_{'contiguous' if contiguous else 'scattered'}_chains_per_s"
        results[key] = round(indirect_chains_per_s(contiguous, args.seconds))
    for block in (4096, 65536):
        key = f"loopback_blk_{block // 1024}k_requests_per_s"
        results[key] = round(loopback_blk_requests_per_s(block, args.seconds))
    peer = c_peer(args.seconds)
    if peer is not None:
        for key, value in peer.items():
            results[f"c_peer_{key}"] = round(value)
            ours = results.get(key)
            if isinstance(ours, int) and value:
                results[f"ratio_{key.removesuffix('_chains_per_s')}"] = round(ours / value, 5)
    results["python"] = platform.python_version()
    results["machine"] = f"{platform.machine()} x{os.cpu_count()}"
    if args.json:
        print(json.dumps(results))
        return 0
    width = max(len(k) for k in results)
    for name, shown in results.items():
        text = f"{shown:,}" if isinstance(shown, int) else str(shown)
        print(f"{name:<{width}}  {text:>12}")
    return 0
