"""`virtio bench ring`: device-side ring throughput and loopback blk requests.

The device-side figures time only the device's pop and push calls: the
driver side re-publishes the same descriptors between batches (as a driver
reusing its buffers would) and is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from virtio.devices.blk import BlkDevice, BlkDriver, BlkOptions
from virtio.devices.blk.wire import BLK_REQ_HEADER, SECTOR_SIZE, T_IN
from virtio.memory import Allocator, GuestMemory
from virtio.queue import RingLayout, device_queue, driver_queue
from virtio.transport.loopback import Loopback


def device_chains_per_s(packed: bool, ndesc: int, seconds: float, size: int = 256) -> float:
    memory = GuestMemory()
    memory.add(0, bytearray(16 << 20))
    layout = RingLayout.contiguous(0x1000, size, packed)
    alloc = Allocator(0x100000, 8 << 20)
    driver = driver_queue(memory, layout, allocator=alloc)
    device = device_queue(memory, layout)
    buffers = [[(alloc.alloc(512), 512) for _ in range(ndesc)] for _ in range(size // ndesc)]
    for segs in buffers:
        driver.add(segs[:1], segs[1:], segs)
    done = 0
    spent = 0.0
    clock = time.perf_counter
    pop_many = device.pop_many
    push_many = device.push_many
    deadline = clock() + seconds
    while clock() < deadline:
        t0 = clock()
        chains = pop_many(size)
        push_many([(c, 0) for c in chains])
        spent += clock() - t0
        done += len(chains)
        for token, _ in driver.get_used():
            assert isinstance(token, list)
            driver.add(token[:1], token[1:], token)
    return done / spent


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
    for block in (4096, 65536):
        key = f"loopback_blk_{block // 1024}k_requests_per_s"
        results[key] = round(loopback_blk_requests_per_s(block, args.seconds))
    results["python"] = platform.python_version()
    results["machine"] = f"{platform.machine()} x{os.cpu_count()}"
    if args.json:
        print(json.dumps(results))
        return 0
    width = max(len(k) for k in results)
    for key, value in results.items():
        text = f"{value:,}" if isinstance(value, int) else str(value)
        print(f"{key:<{width}}  {text:>12}")
    return 0
