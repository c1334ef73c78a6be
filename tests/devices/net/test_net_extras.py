"""virtio-net: device statistics, RSS contexts and the inner header hash, device and driver."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.devices.net.test_net import MAC_A, MAC_B, Recorder, deliver, ether, net
from tests.devices.net.test_offload import eth, ipv4, ipv6, tcp, tcp4_frame, tso_hdr, udp
from tests.devices.net.test_rss import MS_KEY
from virtio.devices.net import NetDevice, NetDriver, rss, stats, tunnel
from virtio.devices.net import wire as W
from virtio.devices.net.driver import DRIVER_FEATURES, encode_rss_config
from virtio.errors import NegotiationError, SpecViolation
from virtio.spec.status import DeviceStatus as S

CVQ = "Device Types / Network Device / Device Operation / Control Virtqueue"
N_STATS_DEV = f"devicenormative:{CVQ} / Device Statistics"
N_STATS_DRV = f"drivernormative:{CVQ} / Device Statistics"
N_CTX_DEV = f"devicenormative:{CVQ} / RSS Context"
N_CTX_DRV = f"drivernormative:{CVQ} / RSS Context"
N_TUN_DEV = f"devicenormative:{CVQ} / Inner Header Hash"
N_TUN_DRV = f"drivernormative:{CVQ} / Inner Header Hash"

ALL_HASH = W.HASH_TYPES_ALL
ALL_TUNNELS = W.HASH_TUNNEL_TYPES_ALL
OFFLOADS = W.GUEST_OFFLOAD_BITS | W.HOST_OFFLOAD_BITS | 1 << W.CTRL_GUEST_OFFLOADS
BASIC = W.STATS_TYPE_CVQ | W.STATS_TYPE_RX_BASIC | W.STATS_TYPE_TX_BASIC
EVERY_COUNTED = BASIC | (
    W.STATS_TYPE_RX_CSUM | W.STATS_TYPE_RX_GSO | W.STATS_TYPE_TX_CSUM | W.STATS_TYPE_TX_GSO
)


def healthy(device: NetDevice) -> bool:
    return not device.status & S.DEVICE_NEEDS_RESET


def get_raw(driver: NetDriver, payload: bytes, room: int) -> tuple[int, bytes]:
    return driver.command(W.CTRL_STATS_CLASS, W.STATS_GET, payload, result=room)


def entry(vq: int, types: int) -> bytes:
    """One ``virtio_net_ctrl_queue_stats`` entry, written out by hand."""
    return struct.pack("<HHHHQ", vq, 0, 0, 0, types)


def hdr_of(raw: bytes, at: int = 0) -> tuple[int, int, int, int, int]:
    """type, reserved, vq_index, reserved1, size of the reply header at ``at``."""
    return struct.unpack_from("<BBHHH", raw, at)


# -- device statistics: the device ------------------------------------------------------------


@pytest.mark.normative(N_STATS_DEV)
def test_stats_query_answers_the_types_the_negotiated_features_allow() -> None:
    with net() as (device, driver, _backend):
        assert device.has(W.DEVICE_STATS) and driver.has(W.DEVICE_STATS)
        ack, raw = driver.command(W.CTRL_STATS_CLASS, W.STATS_QUERY, result=8)
        assert ack == W.OK and struct.unpack("<Q", raw) == (EVERY_COUNTED,)
    # Without the offloads the csum and gso statistics cannot be obtained.
    with net(avoid_features=OFFLOADS) as (_device, driver, _backend):
        assert driver.query_stats() == BASIC


@pytest.mark.normative(N_STATS_DEV)
def test_stats_get_reply_layout_and_counts() -> None:
    with net() as (device, driver, backend):
        out = [ether(MAC_B, MAC_A, bytes([i]) * (60 + i)) for i in range(3)]
        for frame in out:
            assert driver.send(frame)
        driver.tx_in_flight()
        back = [ether(MAC_A, MAC_B, b"r" * n) for n in (50, 70)]
        for frame in back:
            assert deliver(device, backend, frame)
        assert len(driver.receive(timeout=2)) == 2
        ctrl = driver.ctrl_queue
        assert ctrl == 2
        commands_before = device._cvq_stats.commands
        payload = entry(0, W.STATS_TYPE_RX_BASIC) + entry(1, W.STATS_TYPE_TX_BASIC)
        payload += entry(ctrl, W.STATS_TYPE_CVQ)
        ack, raw = get_raw(driver, payload, 56 + 56 + 24)
        assert ack == W.OK and len(raw) == 136
        # struct virtio_net_stats_reply_hdr: type, reserved, vq_index, reserved1, size.
        assert hdr_of(raw, 0) == (W.STATS_REPLY_RX_BASIC, 0, 0, 0, 56)
        rx = struct.unpack_from("<6Q", raw, 8)
        notifications, packets, nbytes, interrupts, drops, overruns = rx
        assert (packets, nbytes, drops, overruns) == (2, sum(len(f) for f in back), 0, 0)
        assert notifications >= 1 and interrupts >= 1
        assert hdr_of(raw, 56) == (W.STATS_REPLY_TX_BASIC, 0, 1, 0, 56)
        tx = struct.unpack_from("<6Q", raw, 64)
        assert tx[1:3] == (3, sum(len(f) for f in out)) and tx[4:] == (0, 0)
        assert tx[0] >= 1
        assert hdr_of(raw, 112) == (W.STATS_REPLY_CVQ, 0, ctrl, 0, 24)
        command_num, ok_num = struct.unpack_from("<2Q", raw, 120)
        # Both count the current command.
        assert command_num == commands_before + 1 == device._cvq_stats.commands
        assert ok_num == device._cvq_stats.ok


def test_stats_csum_and_gso_counters() -> None:
    with net(max_tx_frame=4096) as (device, driver, backend):
        built = tcp4_frame(bytes(3000), partial=True)
        driver.send(built.frame, tso_hdr(W.GSO_TCPV4, built, 1000))  # segmented here
        driver.send(built.frame[:200], W.NetHdr())
        driver.tx_in_flight()
        assert len(backend.sent) == 4
        deliver(device, backend, ether(MAC_A, MAC_B, bytes(60)))
        deliver(device, backend, ether(MAC_A, MAC_B, bytes(60)), W.NetHdr(flags=W.HDR_F_DATA_VALID))
        gso = tcp4_frame(bytes(2000), partial=True)
        assert deliver(device, backend, gso.frame, tso_hdr(W.GSO_TCPV4, gso, 1000))
        assert len(driver.receive(timeout=2)) == 3
        tx = driver.queue_stats(1)
        assert (tx["tx_packets"], tx["tx_csum_none"], tx["tx_needs_csum"]) == (4, 1, 1)
        assert (tx["tx_gso_packets"], tx["tx_gso_bytes"]) == (1, len(built.frame))
        assert tx["tx_gso_segments"] == 3 and tx["tx_gso_packets_noseg"] == 0
        assert tx["tx_gso_segments_bytes"] == sum(len(f) for _, f in backend.sent[:3])
        rx = driver.queue_stats(0)
        assert (rx["rx_csum_none"], rx["rx_csum_valid"], rx["rx_needs_csum"]) == (1, 1, 1)
        assert (rx["rx_gso_packets"], rx["rx_gso_bytes"]) == (1, len(gso.frame))
        assert rx["rx_csum_bad"] == rx["rx_gso_packets_coalesced"] == 0


def test_stats_count_drops() -> None:
    device = NetDevice(Recorder(), queue_max_size=8)
    with net(device) as (device, driver, backend):
        # A header the device must not accept: dropped as malformed.
        driver.send(ether(MAC_B, MAC_A, bytes(80)), W.NetHdr(gso_type=0x17))
        driver.tx_in_flight()
        # Eight buffers, the backlog, then one frame too many: an overrun.
        assert backend.deliver is not None
        for _ in range(8 + 256 + 1):
            backend.deliver(W.NetHdr(), ether(MAC_A, MAC_B, bytes(60)))
        device.flush()
        rx = driver.queue_stats(0)
        tx = driver.queue_stats(1)
        assert (tx["tx_drops"], tx["tx_drop_malformed"], tx["tx_packets"]) == (1, 1, 0)
        assert (rx["rx_drops"], rx["rx_drop_overruns"]) == (1, 1)
        assert rx["rx_packets"] == 8


@pytest.mark.normative(N_STATS_DEV)
def test_stats_counters_wrap_around() -> None:
    with net() as (device, driver, _backend):
        device.queue_stats(1).bytes = (1 << 64) + 7
        assert driver.queue_stats(1)["tx_bytes"] == 7


@pytest.mark.normative(N_STATS_DEV)
@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (entry(3, W.STATS_TYPE_RX_BASIC), "vq_index past the queues"),
        (entry(0xFFFF, W.STATS_TYPE_TX_BASIC), "vq_index far past the queues"),
        (entry(0, 1 << 5), "unknown type"),
        (entry(0, 1 << 40), "unknown type above CVQ"),
        (entry(0, W.STATS_TYPE_TX_BASIC), "transmit type on a receive queue"),
        (entry(1, W.STATS_TYPE_RX_BASIC), "receive type on a transmit queue"),
        (entry(0, W.STATS_TYPE_CVQ), "controlq type on a data queue"),
        (entry(2, W.STATS_TYPE_RX_BASIC), "receive type on the controlq"),
        (entry(0, W.STATS_TYPE_RX_SPEED), "a type the device does not count"),
        (entry(0, W.STATS_TYPE_RX_BASIC)[:15], "short entry"),
        (entry(0, W.STATS_TYPE_RX_BASIC) + b"\0", "ragged payload"),
        # One bad entry fails the whole command, the good one before it too.
        (entry(0, W.STATS_TYPE_RX_BASIC) + entry(9, W.STATS_TYPE_RX_BASIC), "one bad entry"),
    ],
)
def test_stats_get_refuses_bad_requests(payload: bytes, why: str) -> None:
    with net() as (device, driver, _backend):
        ack, raw = get_raw(driver, payload, 200)
        assert ack == W.ERR and raw == b"", why
        assert healthy(device)


@pytest.mark.normative(N_STATS_DEV)
def test_stats_types_whose_feature_was_not_negotiated_are_refused() -> None:
    with net(avoid_features=OFFLOADS) as (device, driver, _backend):
        for vq, types in (
            (0, W.STATS_TYPE_RX_CSUM),
            (0, W.STATS_TYPE_RX_GSO),
            (1, W.STATS_TYPE_TX_GSO),
        ):
            assert get_raw(driver, entry(vq, types), 100)[0] == W.ERR
        assert get_raw(driver, entry(0, W.STATS_TYPE_RX_BASIC), 100)[0] == W.OK
        assert healthy(device)


def test_stats_commands_hostile_framing_answer_err() -> None:
    with net() as (device, driver, _backend):
        query = driver.command(W.CTRL_STATS_CLASS, W.STATS_QUERY, b"\0", result=8)
        assert query[0] == W.ERR  # QUERY takes no data
        assert driver.command(W.CTRL_STATS_CLASS, W.STATS_QUERY, result=7)[0] == W.ERR
        assert driver.command(W.CTRL_STATS_CLASS, 2, result=8)[0] == W.ERR
        big = entry(0, W.STATS_TYPE_RX_BASIC) * (W.MAX_CTRL_PAYLOAD // 16 + 1)
        assert get_raw(driver, big, 100)[0] == W.ERR
        # At the limit: as many replies as fit, no more.
        many = entry(0, W.STATS_TYPE_RX_BASIC) * (W.MAX_CTRL_PAYLOAD // 16)
        ack, raw = get_raw(driver, many, 4096)
        assert ack == W.OK and len(raw) == 4096 // 56 * 56
        assert healthy(device)
    with net(avoid_features=1 << W.DEVICE_STATS) as (device, driver, _backend):
        assert driver.command(W.CTRL_STATS_CLASS, W.STATS_QUERY, result=8)[0] == W.ERR
        with pytest.raises(NegotiationError):
            driver.query_stats()
        assert healthy(device)


@pytest.mark.normative(N_STATS_DEV)
def test_stats_reply_fills_only_what_the_buffer_holds() -> None:
    with net() as (device, driver, _backend):
        payload = entry(0, W.STATS_TYPE_RX_BASIC | W.STATS_TYPE_RX_CSUM) + entry(
            2, W.STATS_TYPE_CVQ
        )
        ack, raw = get_raw(driver, payload, 56 + 30)
        assert ack == W.OK and len(raw) == 56  # whole replies only
        assert hdr_of(raw) == (W.STATS_REPLY_RX_BASIC, 0, 0, 0, 56)
        ack, raw = get_raw(driver, payload, 10)
        assert ack == W.OK and raw == b""
        ack, raw = get_raw(driver, payload, 500)
        assert ack == W.OK and len(raw) == 56 + 40 + 24
        assert [hdr_of(raw, at)[0] for at in (0, 56, 96)] == [0, 1, 32]
        assert healthy(device)


def test_stats_start_again_after_a_reset() -> None:
    with net() as (device, driver, backend):
        deliver(device, backend, ether(MAC_A, MAC_B, bytes(60)))
        assert driver.queue_stats(0)["rx_packets"] == 1
        driver.initialize()
        driver.start()
        assert driver.stats_types is None
        assert driver.queue_stats(0)["rx_packets"] == 0


# -- device statistics: the driver ------------------------------------------------------------


@contextmanager
def recording_commands(driver: NetDriver) -> Iterator[list[tuple[int, int, bytes, int]]]:
    calls: list[tuple[int, int, bytes, int]] = []
    real = driver.command

    def spy(cls: int, cmd: int, payload: bytes = b"", result: int = 0) -> tuple[int, bytes]:
        calls.append((cls, cmd, payload, result))
        return real(cls, cmd, payload, result)

    driver.command = spy  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del driver.command


@pytest.mark.normative(N_STATS_DRV)
def test_driver_queries_types_before_getting_them() -> None:
    with net() as (_device, driver, _backend):
        with pytest.raises(NegotiationError) as err:
            driver.get_stats([(0, W.STATS_TYPE_RX_BASIC)])
        assert err.value.normative == N_STATS_DRV
        assert driver.query_stats() == EVERY_COUNTED
        replies = driver.get_stats([(0, W.STATS_TYPE_RX_BASIC)])
        assert [(r.type, r.vq_index) for r in replies] == [(0, 0)]
    with net(avoid_features=OFFLOADS) as (_device, driver, _backend):
        driver.query_stats()
        with pytest.raises(NegotiationError):
            driver.get_stats([(0, W.STATS_TYPE_RX_CSUM)])  # not in supported_stats_types
        assert driver.stats_types_for(0) == W.STATS_TYPE_RX_BASIC


@pytest.mark.normative(N_STATS_DRV)
def test_driver_asks_only_types_valid_for_the_queue() -> None:
    with net() as (_device, driver, _backend):
        driver.query_stats()
        for vq, types in (
            (0, W.STATS_TYPE_TX_BASIC),
            (1, W.STATS_TYPE_RX_BASIC),
            (2, W.STATS_TYPE_RX_BASIC),
            (0, W.STATS_TYPE_CVQ),
        ):
            with pytest.raises(NegotiationError):
                driver.get_stats([(vq, types)])
        with pytest.raises(ValueError):
            driver.get_stats([(7, W.STATS_TYPE_RX_BASIC)])
        assert driver.stats_types_for(2) == W.STATS_TYPE_CVQ
        assert driver.stats_types_for(1) == W.STATS_TYPES_TX & EVERY_COUNTED


@pytest.mark.normative(N_STATS_DRV)
def test_driver_result_buffer_holds_every_reply() -> None:
    with net() as (_device, driver, _backend):
        driver.query_stats()
        requests = [
            (0, W.STATS_TYPE_RX_BASIC | W.STATS_TYPE_RX_GSO),
            (1, W.STATS_TYPE_TX_CSUM),
            (2, W.STATS_TYPE_CVQ),
        ]
        with recording_commands(driver) as calls:
            replies = driver.get_stats(requests)
        ((_cls, _cmd, payload, result),) = calls
        assert result == 56 + 40 + 24 + 24
        assert payload == b"".join(entry(vq, t) for vq, t in requests)
        assert [(r.type, r.vq_index) for r in replies] == [(0, 0), (2, 0), (17, 1), (32, 2)]
        assert set(replies[2].values) == {"tx_csum_none", "tx_needs_csum"}


@pytest.mark.parametrize(
    "forged",
    [
        struct.pack("<BBHHH", 0, 0, 0, 0, 4) + bytes(48),  # size below the header
        struct.pack("<BBHHH", 0, 0, 0, 0, 64) + bytes(48),  # size past the buffer
        struct.pack("<BBHHH", 0, 0, 0, 0, 16) + bytes(40),  # shorter than its layout
        stats.encode_reply(W.STATS_REPLY_RX_BASIC, 3, [0] * 6),  # another queue
        stats.encode_reply(W.STATS_REPLY_RX_CSUM, 0, [0] * 4),  # not requested
    ],
)
def test_driver_rejects_malformed_replies(forged: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    with net() as (device, driver, _backend):
        driver.query_stats()
        monkeypatch.setattr(device, "_stats_reply", lambda _t, _vq: forged)
        with pytest.raises(SpecViolation) as err:
            driver.get_stats([(0, W.STATS_TYPE_RX_BASIC)])
        assert err.value.normative == N_STATS_DEV
        assert driver.broken is None  # the driver goes on
        monkeypatch.undo()
        assert driver.get_stats([(0, W.STATS_TYPE_RX_BASIC)])[0].vq_index == 0


def test_stats_codecs_round_trip() -> None:
    raw = stats.encode_reply(W.STATS_REPLY_TX_GSO, 5, [1, 2, 3, 4, 5, 1 << 64])
    assert len(raw) == stats.reply_size(W.STATS_REPLY_TX_GSO) == 56
    (reply,) = stats.decode_replies(raw)
    assert reply.type == W.STATS_REPLY_TX_GSO and reply.vq_index == 5
    assert list(reply.values.values()) == [1, 2, 3, 4, 5, 0]
    # An unknown type is skipped by its size; longer known replies keep their known fields.
    unknown = struct.pack("<BBHHH", 40, 0, 2, 0, 16) + bytes(8)
    longer = stats.encode_reply(W.STATS_REPLY_TX_CSUM, 1, [4, 5, 6])
    replies = stats.decode_replies(unknown + longer)
    assert [(r.type, r.values) for r in replies] == [
        (40, {}),
        (17, {"tx_csum_none": 4, "tx_needs_csum": 5}),
    ]
    assert stats.decode_request(stats.encode_request([(3, 1 << 32)])) == [(3, 1 << 32)]


# -- RSS contexts ------------------------------------------------------------------------------

RSS_FEATURES = DRIVER_FEATURES | 1 << W.RSS


def config4(table: list[int] | None = None, **kw: int) -> rss.RssConfig:
    return rss.RssConfig(
        hash_types=kw.get("hash_types", ALL_HASH),
        indirection_table=[0, 1, 2, 3] if table is None else table,
        unclassified_queue=kw.get("unclassified", 0),
        key=MS_KEY,
        max_tx_vq=kw.get("max_tx_vq", 4),
    )


def ctx_payload(ctx: int, config: rss.RssConfig, reserved: bytes = bytes(6)) -> bytes:
    return struct.pack("<H", ctx) + reserved + encode_rss_config(config)


@contextmanager
def rss_net(rss_contexts: int = 8) -> Iterator[tuple[NetDevice, NetDriver, Recorder]]:
    """Four queue pairs with RSS and RSS contexts negotiated.

    VIRTIO_NET_F_RSS_CONTEXT is bit 64: it crosses the third feature word.
    """
    device = NetDevice(Recorder(), queue_pairs=4, rss_contexts=rss_contexts)
    with net(device, queue_pairs=4, features=RSS_FEATURES) as (device, driver, backend):
        yield device, driver, backend


@pytest.mark.normative(N_CTX_DEV)
def test_rss_context_offered_only_with_rss_and_at_least_one_context() -> None:
    assert not NetDevice(queue_pairs=1).offered_features >> W.RSS_CONTEXT & 1
    assert not NetDevice(queue_pairs=4, rss_contexts=0).offered_features >> W.RSS_CONTEXT & 1
    assert (
        not NetDevice(queue_pairs=4, offer_mask=~(1 << W.RSS)).offered_features >> W.RSS_CONTEXT & 1
    )
    device = NetDevice(queue_pairs=4, rss_contexts=3)
    assert device.offered_features >> W.RSS_CONTEXT & 1
    with rss_net(rss_contexts=3) as (device, driver, _backend):
        assert driver.has(W.RSS_CONTEXT)
        ack, raw = driver.command(W.CTRL_RSS_CTX_CLASS, W.RSS_CTX_CAP_GET, result=2)
        assert ack == W.OK and struct.unpack("<H", raw) == (3,)
        assert driver.rss_context_cap() == 3


def test_rss_context_add_modify_delete() -> None:
    with rss_net() as (device, driver, backend):
        first = config4([3, 3], hash_types=W.HASH_TYPE_IPV4, unclassified=2)
        cmd = W.CTRL_RSS_CTX_CLASS
        # Reserved bytes are ignored.
        assert driver.command(cmd, W.RSS_CTX_ADD, ctx_payload(1, first, b"\xff" * 6))[0] == W.OK
        assert device.rss_contexts[1] == first
        assert driver.command(cmd, W.RSS_CTX_ADD, ctx_payload(1, first))[0] == W.ERR  # exists
        assert driver.command(cmd, W.RSS_CTX_MOD, ctx_payload(2, first))[0] == W.ERR  # absent
        frame = ipv4(6, tcp(b"x"))
        assert device.context_queue(1, eth(0x0800, frame)) == 3
        assert device.context_queue(1, eth(0x0806, bytes(28))) == 2  # unclassified
        second = config4([1], hash_types=W.HASH_TYPE_IPV4)
        assert driver.modify_rss_context(1, second) == W.OK
        assert device.context_queue(1, eth(0x0800, frame)) == 1
        # Contexts do not steer received packets (nothing in 1.4 selects one): pair 3
        # was context 1's choice, the default configuration puts it elsewhere.
        assert driver.set_rss(config4([0], hash_types=W.HASH_TYPE_IPV4)) == W.OK
        assert deliver(device, backend, eth(0x0800, frame))
        assert driver.receive(timeout=2, pair=0)
        assert driver.delete_rss_context(1) == W.OK and device.rss_contexts == {}
        assert driver.command(cmd, W.RSS_CTX_DEL, struct.pack("<H", 1))[0] == W.ERR
        assert healthy(device)


@pytest.mark.parametrize(
    ("cmd", "payload", "why"),
    [
        (W.RSS_CTX_ADD, ctx_payload(0, config4()), "id 0"),
        (W.RSS_CTX_ADD, ctx_payload(9, config4()), "id past max_rss_contexts"),
        (W.RSS_CTX_ADD, b"\x01", "one byte"),
        (W.RSS_CTX_ADD, struct.pack("<H", 1) + bytes(5), "header cut short"),
        (W.RSS_CTX_ADD, ctx_payload(1, config4())[:-1], "key cut short"),
        (W.RSS_CTX_ADD, ctx_payload(1, config4([0, 1, 2, 3]))[:20], "table cut short"),
        (W.RSS_CTX_ADD, ctx_payload(1, config4([0, 1, 2, 7])), "queue 7 is not a receive queue"),
        (W.RSS_CTX_ADD, ctx_payload(1, config4(hash_types=1 << 9)), "unsupported hash type"),
        (W.RSS_CTX_ADD, ctx_payload(1, config4(max_tx_vq=0)), "max_tx_vq 0"),
        (W.RSS_CTX_DEL, struct.pack("<HH", 1, 0), "oversized DEL"),
        (W.RSS_CTX_DEL, b"", "empty DEL"),
        (W.RSS_CTX_CAP_GET, b"\0", "CAP_GET with data"),
        (4, b"", "unknown command"),
    ],
)
def test_rss_context_hostile_commands_answer_err(cmd: int, payload: bytes, why: str) -> None:
    with rss_net() as (device, driver, _backend):
        assert driver.command(W.CTRL_RSS_CTX_CLASS, cmd, payload, result=2)[0] == W.ERR, why
        assert device.rss_contexts == {} and healthy(device)


def test_rss_context_needs_the_feature_and_blocks_vq_pairs_set() -> None:
    with rss_net() as (device, driver, _backend):
        assert driver.command(W.CTRL_RSS_CTX_CLASS, W.RSS_CTX_CAP_GET, result=1)[0] == W.ERR
        assert driver.add_rss_context(2, config4()) == W.OK
        pairs = struct.pack("<H", 2)
        assert driver.command(W.CTRL_MQ_CLASS, W.MQ_VQ_PAIRS_SET, pairs)[0] == W.ERR
        assert healthy(device)
    with net(NetDevice(Recorder(), queue_pairs=4)) as (device, driver, _backend):
        assert not driver.has(W.RSS_CONTEXT)  # no RSS, no contexts
        assert driver.command(W.CTRL_RSS_CTX_CLASS, W.RSS_CTX_CAP_GET, result=2)[0] == W.ERR
        assert healthy(device)


@pytest.mark.normative(N_CTX_DEV)
def test_reset_clears_rss_contexts() -> None:
    with rss_net() as (device, driver, _backend):
        assert driver.add_rss_context(1, config4()) == W.OK
        assert driver.add_rss_context(8, config4([2])) == W.OK
        assert sorted(device.rss_contexts) == [1, 8]
        driver.initialize()
        assert device.rss_contexts == {} and driver.rss_contexts == set()
        driver.start()
        device.negotiated |= 1 << W.RSS_CONTEXT  # bit 64 again (see rss_net)
        driver.negotiated |= 1 << W.RSS_CONTEXT
        assert driver.delete_rss_context(1) == W.ERR
        assert driver.add_rss_context(1, config4()) == W.OK


@pytest.mark.normative(N_CTX_DRV)
def test_driver_rss_context_rules() -> None:
    with net(NetDevice(Recorder(), queue_pairs=4), queue_pairs=4) as (_device, driver, _backend):
        with pytest.raises(NegotiationError) as err:
            driver.rss_context_cap()
        assert err.value.normative == N_CTX_DRV
    with rss_net(rss_contexts=2) as (device, driver, _backend):
        sent = device._cvq_stats.commands
        for bad in (0, 3):
            with pytest.raises(NegotiationError):
                driver.add_rss_context(bad, config4())
        assert device._cvq_stats.commands == sent + 1  # only the CAP_GET went out
        assert driver.add_rss_context(1, config4()) == W.OK
        with pytest.raises(NegotiationError) as err:
            driver.set_queue_pairs(2)
        assert err.value.normative == N_CTX_DRV
        assert driver.delete_rss_context(1) == W.OK
        driver.set_queue_pairs(2)


# -- inner header hash ---------------------------------------------------------------------

C4 = bytes([198, 51, 100, 7])
D4 = bytes([203, 0, 113, 9])
C6 = bytes.fromhex("20010db8000000000000000000000007")
D6 = bytes.fromhex("20010db8000000000000000000000009")


def inner_ip4(sport: int = 1111, dport: int = 2222) -> bytes:
    return ipv4(6, tcp(b"inner", sport=sport, dport=dport), src=C4, dst=D4)


def inner_ip6() -> bytes:
    return ipv6(6, tcp(b"inner", sport=3333, dport=4444), src=C6, dst=D6)


def inner_eth() -> bytes:
    return b"\x02\x00\x00\x00\x00\x0a\x02\x00\x00\x00\x00\x0b\x08\x00" + inner_ip4()


def outer_udp(dport: int, body: bytes, sport: int = 49152) -> bytes:
    return eth(0x0800, ipv4(17, udp(body, sport=sport, dport=dport)))


def gre(flags: int, proto: int, options: bytes = b"") -> bytes:
    return struct.pack("!BBH", flags, 0, proto) + options


# (name, frame, the inner packet as an Ethernet frame, the types it matches)
TUNNELS = [
    (
        "gre-2784",
        eth(0x0800, ipv4(47, gre(0, 0x0800) + inner_ip4())),
        eth(0x0800, inner_ip4()),
        W.HASH_TUNNEL_TYPE_GRE_2784,
    ),
    (
        "gre-2784-csum",
        eth(0x0800, ipv4(47, gre(0x80, 0x0800, bytes(4)) + inner_ip4())),
        eth(0x0800, inner_ip4()),
        W.HASH_TUNNEL_TYPE_GRE_2784,
    ),
    (
        "gre-2890-key",
        eth(0x0800, ipv4(47, gre(0x20, 0x0800, b"KEY!") + inner_ip4())),
        eth(0x0800, inner_ip4()),
        W.HASH_TUNNEL_TYPE_GRE_2890,
    ),
    (
        "gre-2890-all",
        eth(0x0800, ipv4(47, gre(0xB0, 0x0800, bytes(12)) + inner_ip4())),
        eth(0x0800, inner_ip4()),
        W.HASH_TUNNEL_TYPE_GRE_2890,
    ),
    (
        "gre-7676-v6-delivery",
        eth(0x86DD, ipv6(47, gre(0, 0x0800) + inner_ip4())),
        eth(0x0800, inner_ip4()),
        W.HASH_TUNNEL_TYPE_GRE_7676,
    ),
    (
        "gre-7676-v6-payload",
        eth(0x0800, ipv4(47, gre(0, 0x86DD) + inner_ip6())),
        eth(0x86DD, inner_ip6()),
        W.HASH_TUNNEL_TYPE_GRE_7676,
    ),
    (
        "gre-udp",
        outer_udp(4754, gre(0, 0x0800) + inner_ip4()),
        eth(0x0800, inner_ip4()),
        W.HASH_TUNNEL_TYPE_GRE_UDP,
    ),
    (
        "vxlan",
        outer_udp(4789, bytes([0x08, 0, 0, 0, 0, 0, 42, 0]) + inner_eth()),
        inner_eth(),
        W.HASH_TUNNEL_TYPE_VXLAN,
    ),
    (
        "vxlan-gpe-ip4",
        outer_udp(4790, bytes([0x0C, 0, 0, 1, 0, 0, 42, 0]) + inner_ip4()),
        eth(0x0800, inner_ip4()),
        W.HASH_TUNNEL_TYPE_VXLAN_GPE,
    ),
    (
        "vxlan-gpe-eth",
        outer_udp(4790, bytes([0x0C, 0, 0, 3, 0, 0, 42, 0]) + inner_eth()),
        inner_eth(),
        W.HASH_TUNNEL_TYPE_VXLAN_GPE,
    ),
    (
        "geneve",
        outer_udp(6081, bytes([0x01, 0, 0x65, 0x58, 0, 0, 42, 0]) + bytes(4) + inner_eth()),
        inner_eth(),
        W.HASH_TUNNEL_TYPE_GENEVE,
    ),
    (
        "geneve-ip6",
        outer_udp(6081, bytes([0x00, 0, 0x86, 0xDD, 0, 0, 42, 0]) + inner_ip6()),
        eth(0x86DD, inner_ip6()),
        W.HASH_TUNNEL_TYPE_GENEVE,
    ),
    ("ipip", eth(0x0800, ipv4(4, inner_ip4())), eth(0x0800, inner_ip4()), W.HASH_TUNNEL_TYPE_IPIP),
    (
        "ip6-in-ip4",
        eth(0x0800, ipv4(41, inner_ip6())),
        eth(0x86DD, inner_ip6()),
        W.HASH_TUNNEL_TYPE_IPIP,
    ),
    (
        "ip4-in-ip6",
        eth(0x86DD, ipv6(4, inner_ip4())),
        eth(0x0800, inner_ip4()),
        W.HASH_TUNNEL_TYPE_IPIP,
    ),
    (
        "nvgre",
        eth(0x0800, ipv4(47, gre(0x20, 0x6558, b"\x00\x01\x02\x03") + inner_eth())),
        inner_eth(),
        W.HASH_TUNNEL_TYPE_NVGRE | W.HASH_TUNNEL_TYPE_GRE_2890,
    ),
    (
        "nvgre-v6",
        eth(0x86DD, ipv6(47, gre(0x20, 0x6558, b"\x00\x01\x02\x03") + inner_eth())),
        inner_eth(),
        W.HASH_TUNNEL_TYPE_NVGRE | W.HASH_TUNNEL_TYPE_GRE_7676,
    ),
]


@pytest.mark.normative(N_TUN_DEV)
@pytest.mark.parametrize(("name", "frame", "inner", "kinds"), TUNNELS, ids=[t[0] for t in TUNNELS])
def test_inner_header_hash_per_encapsulation(
    name: str, frame: bytes, inner: bytes, kinds: int
) -> None:
    outer = rss.hash_packet(frame, MS_KEY, ALL_HASH)
    want = rss.hash_packet(inner, MS_KEY, ALL_HASH)
    assert want is not None and want != outer
    assert want[1] in (W.HASH_REPORT_TCPV4, W.HASH_REPORT_TCPV6)
    for bit in (1 << b for b in range(9) if kinds >> b & 1):
        assert tunnel.hash_frame(frame, MS_KEY, ALL_HASH, bit) == want, name
    assert tunnel.hash_frame(frame, MS_KEY, ALL_HASH, ALL_TUNNELS) == want
    # Not enabled, or nothing enabled: the outer header is hashed.
    assert tunnel.hash_frame(frame, MS_KEY, ALL_HASH, ALL_TUNNELS & ~kinds) == outer
    assert tunnel.hash_frame(frame, MS_KEY, ALL_HASH, 0) == outer


NOT_TUNNELS = [
    ("gre-routing-bit", eth(0x0800, ipv4(47, gre(0x40, 0x0800, bytes(4)) + inner_ip4()))),
    (
        "gre-version-1",
        eth(0x0800, ipv4(47, struct.pack("!BBH", 0x30, 1, 0x880B) + bytes(8) + inner_ip4())),
    ),
    ("gre-unknown-payload", eth(0x0800, ipv4(47, gre(0, 0x88BE) + inner_ip4()))),
    ("gre-cut-short", eth(0x0800, ipv4(47, b"\x00\x00"))),
    ("vxlan-no-i-flag", outer_udp(4789, bytes(8) + inner_eth())),
    (
        "vxlan-inner-cut-short",
        outer_udp(4789, bytes([0x08, 0, 0, 0, 0, 0, 42, 0]) + inner_eth()[:13]),
    ),
    ("vxlan-other-port", outer_udp(4790 + 1000, bytes([0x08, 0, 0, 0, 0, 0, 42, 0]) + inner_eth())),
    ("gpe-no-p-flag", outer_udp(4790, bytes([0x08, 0, 0, 1, 0, 0, 42, 0]) + inner_ip4())),
    ("gpe-nsh", outer_udp(4790, bytes([0x0C, 0, 0, 4, 0, 0, 42, 0]) + inner_ip4())),
    ("geneve-version-1", outer_udp(6081, bytes([0x40, 0, 0x65, 0x58, 0, 0, 42, 0]) + inner_eth())),
    ("ipip-outer-fragment", eth(0x0800, ipv4(4, inner_ip4(), frag=0x2000))),
    ("plain-tcp", eth(0x0800, inner_ip4())),
]


@pytest.mark.normative(N_TUN_DEV)
@pytest.mark.parametrize(("name", "frame"), NOT_TUNNELS, ids=[t[0] for t in NOT_TUNNELS])
def test_frames_that_are_not_enabled_encapsulations_hash_the_outer_header(
    name: str, frame: bytes
) -> None:
    assert tunnel.inner_frame(frame, ALL_TUNNELS) is None, name
    assert tunnel.hash_frame(frame, MS_KEY, ALL_HASH, ALL_TUNNELS) == rss.hash_packet(
        frame, MS_KEY, ALL_HASH
    )


@settings(max_examples=400)
@given(
    st.sampled_from([4, 41, 47, 4754, 4789, 4790, 6081]),
    st.binary(max_size=80),
    st.booleans(),
)
def test_inner_header_hash_never_raises(kind: int, body: bytes, v6: bool) -> None:
    if kind > 255:
        frame = eth(0x0800, ipv4(17, udp(body, dport=kind)))
    else:
        frame = eth(0x86DD, ipv6(kind, body)) if v6 else eth(0x0800, ipv4(kind, body))
    found = tunnel.hash_frame(frame, MS_KEY, ALL_HASH, ALL_TUNNELS)
    assert found is None or 0 <= found[0] < 1 << 32
    # Cut anywhere, too (the IP lengths then claim more than is there).
    for cut in (15, 30, len(frame) - 1):
        tunnel.hash_frame(frame[:cut], MS_KEY, ALL_HASH, ALL_TUNNELS)


HASH_FEATURES = DRIVER_FEATURES | 1 << W.HASH_REPORT


def hash_config(types: int) -> bytes:
    return struct.pack("<I8sB", types, bytes(8), len(MS_KEY)) + MS_KEY


@pytest.mark.normative(N_TUN_DEV)
def test_hash_report_uses_the_inner_header_when_enabled() -> None:
    _name, frame, inner, _kinds = next(t for t in TUNNELS if t[0] == "vxlan")
    outer = rss.hash_packet(frame, MS_KEY, ALL_HASH)
    want = rss.hash_packet(inner, MS_KEY, ALL_HASH)
    assert outer is not None and outer[1] == W.HASH_REPORT_UDPV4 and want is not None
    with net(features=HASH_FEATURES) as (device, driver, backend):
        assert driver.has(W.HASH_REPORT) and driver.has(W.HASH_TUNNEL) and driver.hdr_size == 20
        assert driver.supported_tunnel_types() == ALL_TUNNELS
        ack, _ = driver.command(W.CTRL_MQ_CLASS, W.MQ_HASH_CONFIG, hash_config(ALL_HASH))
        assert ack == W.OK

        def reported() -> tuple[int, int]:
            assert deliver(device, backend, frame)
            ((hdr, got),) = driver.receive(timeout=2)
            assert got == frame
            return hdr.hash_value, hdr.hash_report

        assert reported() == outer  # initially every type is disabled
        assert driver.set_hash_tunnel(W.HASH_TUNNEL_TYPE_VXLAN) == W.OK
        assert reported() == want
        assert driver.set_hash_tunnel(W.HASH_TUNNEL_TYPE_GENEVE) == W.OK
        assert reported() == outer  # VXLAN no longer enabled
        assert driver.set_hash_tunnel(0) == W.OK  # disabled for every type
        assert device.tunnel_types == 0 and reported() == outer
        assert driver.set_hash_tunnel(ALL_TUNNELS) == W.OK
        driver.initialize()  # a reset disables it too
        assert device.tunnel_types == 0


@pytest.mark.normative(N_TUN_DEV)
def test_rss_selects_the_queue_by_the_inner_hash() -> None:
    frames = [
        outer_udp(4789, bytes([0x08, 0, 0, 0, 0, 0, 42, 0]) + eth(0x0800, inner_ip4(sport=s)))
        for s in range(1000, 1016)
    ]
    table = [0, 1, 2, 3] * 4
    # TCPv4 only: the outer UDP header gives no hash, so without inner hash all are unclassified.
    config = config4(table, hash_types=W.HASH_TYPE_TCPV4, unclassified=3)
    with rss_net() as (device, driver, backend):
        assert driver.set_rss(config) == W.OK
        expect = []
        for frame in frames:
            found = rss.hash_packet(frame[14 + 20 + 8 + 8 :], MS_KEY, W.HASH_TYPE_TCPV4)
            assert found is not None
            expect.append(table[found[0] & 15])
        assert len(set(expect)) > 1
        assert [device._steer(f) for f in frames] == [3] * len(frames)
        assert driver.set_hash_tunnel(W.HASH_TUNNEL_TYPE_VXLAN) == W.OK
        assert [device._steer(f) for f in frames] == expect
        for frame, pair in zip(frames, expect, strict=True):
            assert deliver(device, backend, frame)
            assert [f for _, f in driver.receive(timeout=2, pair=pair)] == [frame]
        # An RSS context hashes the same way.
        assert driver.add_rss_context(1, config) == W.OK
        assert [device.context_queue(1, f) for f in frames] == expect


@pytest.mark.normative(N_TUN_DEV)
@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (struct.pack("<I", 1 << 9), "a type the device does not support"),
        (struct.pack("<I", 0xFFFFFFFF), "every bit"),
        (b"\x01\x00\x00", "short"),
        (b"\x01\x00\x00\x00\x00", "oversized"),
        (b"", "empty"),
    ],
)
def test_hash_tunnel_set_refuses_bad_payloads(payload: bytes, why: str) -> None:
    with net(features=HASH_FEATURES) as (device, driver, _backend):
        assert driver.command(W.CTRL_HASH_TUNNEL_CLASS, W.HASH_TUNNEL_SET, payload)[0] == W.ERR, why
        assert driver.command(W.CTRL_HASH_TUNNEL_CLASS, 1, struct.pack("<I", 1))[0] == W.ERR
        assert device.tunnel_types == 0 and healthy(device)


def test_hash_tunnel_offer_and_config() -> None:
    device = NetDevice()
    assert device.offered_features >> W.HASH_TUNNEL & 1
    assert (
        int.from_bytes(device.config[W.CFG_TUNNEL_TYPES : W.CFG_TUNNEL_TYPES + 4], "little")
        == ALL_TUNNELS
    )
    # Neither RSS nor HASH_REPORT offered: no inner header hash either.
    masked = NetDevice(offer_mask=~(1 << W.HASH_REPORT))
    assert not masked.offered_features >> W.HASH_TUNNEL & 1
    with net() as (device, driver, _backend):
        assert not driver.has(W.HASH_TUNNEL)  # this driver takes no hash by default
        assert driver.command(W.CTRL_HASH_TUNNEL_CLASS, W.HASH_TUNNEL_SET, bytes(4))[0] == W.ERR
        assert healthy(device)


@pytest.mark.normative(N_TUN_DRV)
def test_driver_inner_header_hash_rules() -> None:
    with net() as (_device, driver, _backend):
        with pytest.raises(NegotiationError) as err:
            driver.set_hash_tunnel(W.HASH_TUNNEL_TYPE_VXLAN)
        assert err.value.normative == N_TUN_DRV
    with net(features=HASH_FEATURES) as (device, driver, _backend):
        # Bits the spec does not document are ignored.
        device.config[W.CFG_TUNNEL_TYPES : W.CFG_TUNNEL_TYPES + 4] = struct.pack(
            "<I", 1 << 20 | W.HASH_TUNNEL_TYPE_IPIP
        )
        assert driver.supported_tunnel_types() == W.HASH_TUNNEL_TYPE_IPIP
        sent = device._cvq_stats.commands
        for bad in (W.HASH_TUNNEL_TYPE_VXLAN, 1 << 20):
            with pytest.raises(NegotiationError) as err:
                driver.set_hash_tunnel(bad)
            assert err.value.normative == N_TUN_DRV
        assert device._cvq_stats.commands == sent  # nothing went to the device
        assert driver.set_hash_tunnel(W.HASH_TUNNEL_TYPE_IPIP) == W.OK
        assert device.tunnel_types == W.HASH_TUNNEL_TYPE_IPIP
