"""Property tests: random interleavings of add/pop/push/harvest on both ring kinds.

Every buffer must come back exactly once, with the data the device wrote, and
no notification may be lost, whatever the sizes, features and index wrap-around.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.queue.helpers import Pair, make_pair
from virtio.queue import Chain, SplitDeviceQueue, SplitDriverQueue
from virtio.queue.common import LE16

SPLIT_IDS = [
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Available Ring",
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Used Ring",
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Used Ring",
    "devicenormative:Basic Facilities of a Virtio Device / Message Framing",
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Descriptor Table",
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Descriptor Table / Indirect Descriptors",
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / Used Buffer Notification Suppression",
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / Used Buffer Notification Suppression",
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / Available Buffer Notification Suppression",
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues / Available Buffer Notification Suppression",
    "devicenormative:Reserved Feature Bits",
]
PACKED_IDS = [
    "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues",
    "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues / The Virtqueue Descriptor Table",
    "drivernormative:Basic Facilities of a Virtio Device / PAcked Virtqueues / The Virtqueue Descriptor Table",
    "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues / Scatter-Gather Support",
    "drivernormative:Basic Facilities of a Virtio Device / Packed Virtqueues / Scatter-Gather Support",
    "devicenormative:Reserved Feature Bits",
]


def start_split_at(pair: Pair, base: int) -> None:
    """Put both ends of a fresh split ring at index ``base`` (as after SET_VRING_BASE)."""
    driver, device = pair.driver, pair.device
    assert isinstance(driver, SplitDriverQueue) and isinstance(device, SplitDeviceQueue)
    u16 = LE16.with_order(pair.order).struct
    u16.pack_into(driver.ring.avail, 2, base)
    u16.pack_into(driver.ring.used, 2, base)
    driver.avail_idx = driver.last_used = driver._kicked = base
    device.set_base(base)


def response(payload: bytes, size: int) -> bytes:
    """What the device writes back: a digest of what it read, stretched to fit."""
    digest = hashlib.sha256(payload).digest()
    return (digest * (size // len(digest) + 1))[:size]


class Model:
    """Drives one ring pair and checks it against a plain Python model."""

    def __init__(self, pair: Pair, in_order: bool) -> None:
        self.pair = pair
        self.in_order = in_order
        self.next_token = 0
        self.sent: dict[int, tuple[bytes, list[tuple[int, int]], list[tuple[int, int]]]] = {}
        self.popped: list[tuple[Chain, int]] = []  # (chain, token)
        self.returned: set[int] = set()
        self.token_of_chain: dict[int, int] = {}
        self.head_tokens: dict[int, int] = {}

    def add(self, out_sizes: list[int], in_sizes: list[int]) -> bool:
        pair = self.pair
        token = self.next_token
        out_segs = []
        payload = b""
        for i, n in enumerate(out_sizes):
            addr = pair.allocator.alloc(n)
            data = bytes((token * 7 + i * 13 + j) & 0xFF for j in range(n))
            pair.memory.write(addr, data)
            payload += data
            out_segs.append((addr, n))
        in_segs = [(pair.allocator.alloc(n), n) for n in in_sizes]
        try:
            head = pair.driver.add(out_segs, in_segs, token)
        except BufferError:
            for addr, _ in out_segs + in_segs:
                pair.allocator.free(addr)
            return False
        self.next_token += 1
        self.sent[token] = (payload, out_segs, in_segs)
        self.head_tokens[head] = token
        return True

    def pop(self, limit: int) -> None:
        for chain in self.pair.device.pop_many(limit):
            # The chain shows exactly what the driver put in, readable first.
            token = self.head_tokens[chain.head]
            payload, out_segs, in_segs = self.sent[token]
            assert chain.read() == payload
            assert chain.read_len == sum(n for _, n in out_segs)
            assert chain.write_len == sum(n for _, n in in_segs)
            self.popped.append((chain, token))

    def complete(self, picks: list[int]) -> None:
        if not self.popped:
            return
        if self.in_order:
            count = picks[0] % len(self.popped) + 1 if picks else 1
            batch = self.popped[:count]
            del self.popped[:count]
        else:
            batch = []
            for p in picks:
                if self.popped:
                    batch.append(self.popped.pop(p % len(self.popped)))
        items = []
        for chain, token in batch:
            payload = self.sent[token][0]
            reply = response(payload, chain.write_len)
            written = chain.write(reply) if reply else 0
            items.append((chain, written))
        self.pair.device.push_many(items)

    def harvest(self) -> None:
        for token, written in self.pair.driver.get_used():
            assert isinstance(token, int)
            assert token not in self.returned, "a buffer came back twice"
            payload, out_segs, in_segs = self.sent[token]
            in_len = sum(n for _, n in in_segs)
            assert written == in_len
            got = b"".join(self.pair.memory.read(a, n) for a, n in in_segs)
            assert got == response(payload, in_len)
            self.returned.add(token)
            for addr, _ in out_segs + in_segs:
                self.pair.allocator.free(addr)


segment_sizes = st.lists(st.integers(1, 64), min_size=0, max_size=3)


def run_model(data: st.DataObject, pair: Pair, in_order: bool, steps: int) -> Model:
    model = Model(pair, in_order)
    driver, device = pair.driver, pair.device
    for _ in range(steps):
        op = data.draw(st.sampled_from(["add", "add", "pop", "complete", "harvest", "notify"]))
        if op == "add":
            outs = data.draw(segment_sizes)
            ins = data.draw(segment_sizes)
            if not outs and not ins:
                ins = [8]
            # No chain may be longer than the queue size, direct or indirect.
            while len(outs) + len(ins) > pair.layout.size:
                (outs if outs else ins).pop()
            model.add(outs, ins)
        elif op == "pop":
            model.pop(data.draw(st.integers(1, 8)))
        elif op == "complete":
            model.complete(data.draw(st.lists(st.integers(0, 31), min_size=1, max_size=6)))
        elif op == "harvest":
            model.harvest()
        else:
            # No lost wake-ups: a side that re-enables notifications and then
            # sees new work from its peer must be told about it.
            # Each side re-arms until it finds no work, the way a real loop does.
            while driver.enable_interrupts():
                model.harvest()
            if model.popped:
                model.complete([0])
                assert device.needs_notify(), "used buffer notification was suppressed"
            while device.enable_notifications():
                model.pop(64)
            if model.add([], [4]):
                assert driver.kick_needed(), "available buffer notification was suppressed"
    # Drain everything: every buffer comes back exactly once.
    for _ in range(4 * pair.layout.size + 8):
        model.pop(64)
        while model.popped:
            model.complete(list(range(len(model.popped))))
        model.harvest()
    assert model.returned == set(model.sent), "buffers lost"
    assert driver.outstanding == 0
    return model


features = st.fixed_dictionaries(
    {"indirect": st.booleans(), "event_idx": st.booleans(), "in_order": st.booleans()}
)


# Byte order and layout of the ring: modern little-endian, the same ring in big-endian
# (a legacy interface on a big-endian guest), and the legacy layout (one page-aligned
# block, used ring on the next 4096-byte boundary) in both byte orders.
LAYOUTS = {
    "little-endian": ("little", False),
    "big-endian": ("big", False),
    "legacy-little": ("little", True),
    "legacy-big": ("big", True),
}
LEGACY_IDS = [
    "drivernormative:Basic Facilities of a Virtio Device / Virtqueues",
]


@pytest.mark.normative(*SPLIT_IDS, *LEGACY_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    size_log2=st.integers(0, 4),
    feats=features,
    base=st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF)),
)
def test_split_ring_random_interleavings(
    layout: str, data: st.DataObject, size_log2: int, feats: dict[str, bool], base: int
) -> None:
    order, legacy = LAYOUTS[layout]
    pair = make_pair(1 << size_log2, order=order, legacy=legacy, **feats)  # type: ignore[arg-type]
    if legacy:
        # The used ring starts on a Queue Align boundary after the available ring.
        assert pair.layout.device % 4096 == 0
        assert pair.layout.driver == pair.layout.desc + 16 * pair.layout.size
    start_split_at(pair, base)
    run_model(data, pair, feats["in_order"], steps=data.draw(st.integers(10, 120)))


@pytest.mark.normative(*PACKED_IDS)
@pytest.mark.parametrize("order", ["little", "big"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.integers(1, 12), feats=features)
def test_packed_ring_random_interleavings(
    order: str, data: st.DataObject, size: int, feats: dict[str, bool]
) -> None:
    pair = make_pair(size, packed=True, order=order, **feats)  # type: ignore[arg-type]
    run_model(data, pair, feats["in_order"], steps=data.draw(st.integers(10, 120)))


WRAP_IDS = [
    # The device writes data and len before the used idx, across every wrap.
    "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / The Virtqueue Used Ring",
    # The device processes packed descriptors in ring order, lap after lap.
    "devicenormative:Basic Facilities of a Virtio Device / Packed Virtqueues",
]


@pytest.mark.normative(*WRAP_IDS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("in_order", [False, True])
def test_many_wraparounds(packed: bool, in_order: bool) -> None:
    """70,000 buffers through a 4-entry ring: the 16-bit indices wrap more than once."""
    pair = make_pair(4, packed=packed, in_order=in_order, event_idx=True)
    buf = pair.allocator.alloc(16)
    returned = 0
    for i in range(70_000):
        pair.driver.add([], [(buf, 16)], i)
        chains = pair.device.pop_many()
        assert len(chains) == 1
        chains[0].write(i.to_bytes(16, "little"))
        pair.device.push_many([(chains[0], 16)])
        used = pair.driver.get_used()
        assert used == [(i, 16)]
        assert pair.memory.read(buf, 16) == i.to_bytes(16, "little")
        returned += 1
    assert returned == 70_000
