"""Socket I/O for vhost-user messages, shared by the back-end and front-end adapters.

A message is read through the sans-IO :class:`~virtio.vhost_user.wire.Decoder`,
which does every framing check: its 12-byte header first, then exactly its
payload, as :attr:`Decoder.needed` says. The kernel hands over ancillary fds
with the first read that touches the sender's message, so reading header by
header keeps every fd with the message it was sent with (a large read could
join two messages and leave no way to tell whose fds they are).
"""

from __future__ import annotations

import array
import os
import socket

from virtio.vhost_user.wire import MAX_FDS, Decoder, Message, VhostUserError, encode

_FD_SIZE = array.array("i").itemsize


class PeerClosed(VhostUserError):
    """The other side closed the connection."""


def recv_chunk(sock: socket.socket, size: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """Read up to ``size`` bytes and the fds that came with them.

    Like :func:`socket.recv_fds`, which before Python 3.13 ignores ``flags``
    (so ``MSG_DONTWAIT`` would block). Raises :class:`VhostUserError` when
    the peer sent more than ``MAX_FDS`` fds (the kernel dropped the rest);
    the ones received are closed first.
    """
    data, ancdata, msg_flags, _addr = sock.recvmsg(
        size, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE), flags
    )
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
    if msg_flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise VhostUserError(f"a message came with more than {MAX_FDS} fds")
    return data, list(fds)


def recv_message(sock: socket.socket) -> Message:
    """Read one whole message (blocking, within the socket's timeout).

    Fds that came with a message the decoder refuses, or with a message the
    peer never finished, are closed before the error propagates.
    """
    decoder = Decoder()
    try:
        while True:
            data, fds = recv_chunk(sock, decoder.needed)
            messages = decoder.feed(data, fds)
            if not data:
                raise PeerClosed(
                    "connection closed mid-message"
                    if decoder.pending_bytes
                    else "connection closed"
                )
            for msg in messages:
                return msg
    except BaseException:
        for fd in decoder.take_fds():
            os.close(fd)
        raise


def send_message(sock: socket.socket, msg: Message) -> None:
    data = encode(msg)
    if msg.fds:
        sent = socket.send_fds(sock, [data], msg.fds)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)
