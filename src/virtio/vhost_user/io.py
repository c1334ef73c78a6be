"""Socket I/O for vhost-user messages, shared by the back-end and front-end adapters.

A message is read as its 12-byte header first, then exactly its payload.
The kernel hands over ancillary fds with the first read that touches the
sender's message, so reading header by header keeps every fd with the
message it was sent with (a large read could join two messages and leave no
way to tell whose fds they are).
"""

from __future__ import annotations

import os
import socket

from virtio.vhost_user.wire import (
    HEADER,
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION,
    Message,
    VhostUserError,
    encode,
)


class PeerClosed(VhostUserError):
    """The other side closed the connection."""


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk, got, _flags, _addr = socket.recv_fds(sock, n - len(data), MAX_FDS)
        fds.extend(got)
        if not chunk:
            raise PeerClosed("connection closed" if not data else "connection closed mid-message")
        data += chunk
    return bytes(data)


def recv_message(sock: socket.socket) -> Message:
    """Read one whole message (blocking, within the socket's timeout)."""
    fds: list[int] = []
    try:
        header = _recv_exact(sock, HEADER.size, fds)
        request, flags, size = HEADER.struct.unpack(header)
        if flags & 0x3 != VERSION:
            raise VhostUserError(f"bad protocol version {flags & 0x3} in message {request}")
        if size > MAX_PAYLOAD:
            raise VhostUserError(f"payload of {size} bytes in message {request} is too big")
        payload = _recv_exact(sock, size, fds) if size else b""
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(request, payload, flags, fds)


def send_message(sock: socket.socket, msg: Message) -> None:
    data = encode(msg)
    if msg.fds:
        sent = socket.send_fds(sock, [data], msg.fds)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)
