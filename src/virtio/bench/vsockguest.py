"""`virtio bench vsock-guest`: stream throughput of a UML guest through `virtio serve vsock`.

One UML guest (``virtio_uml.device=SOCK:19``) runs the host's socat:

- guest to host: ``socat -u OPEN:/dev/zero,readbytes=N VSOCK-CONNECT:2:5000``
  into a listener on ``UDS_5000`` here that counts bytes, first to last;
- host to guest: this process connects to ``UDS``, writes ``CONNECT 6000``
  and N bytes; the guest's ``socat -u VSOCK-LISTEN:6000 OPEN:/dev/null``
  drains them; timed from the first byte sent to the guest's close.

References in the same run (there is no C vhost-user vsock back-end here:
vhost-device-vsock is not packaged in Debian 12): the same socat pipeline
over a host Unix socket (the host ceiling), and socat ``/dev/zero`` to
``/dev/null`` inside the guest (the guest's own ceiling).

``--profile S`` repeats each direction with the serve process profiled for S
seconds from the first byte (a stack sampler, cProfile, or both) and prints
the hot spots.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from virtio.vm import GuestAssets, GuestResult, VhostUserDevice, prepare, run_guest

CID = 3
G2H_PORT = 5000
H2G_PORT = 6000
CHUNK = 1 << 17  # socat's -b and our recv size
SOCAT = f"hostrun /usr/bin/socat -u -b {CHUNK}"

LOCAL_PART = """
t0=$(hostrun /usr/bin/date +%s.%N)
{socat} OPEN:/dev/zero,readbytes={nbytes} OPEN:/dev/null
rc=$?
t1=$(hostrun /usr/bin/date +%s.%N)
echo "LOCAL $t0 $t1 $rc"
"""
G2H_PART = f"""
{{socat}} OPEN:/dev/zero,readbytes={{nbytes}} VSOCK-CONNECT:2:{G2H_PORT}
echo "RC_G2H $?"
"""
H2G_PART = f"""
echo LISTENING
{{socat}} VSOCK-LISTEN:{H2G_PORT} OPEN:/dev/null
echo "RC_H2G $?"
"""
PARTS = {"local": LOCAL_PART, "g2h": G2H_PART, "h2g": H2G_PART}


def _gbit(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e9 if seconds > 0 else 0.0


@dataclass
class Count:
    """Bytes a host peer moved and when the first and last of them went."""

    nbytes: int = 0
    first: float = 0.0
    last: float = 0.0
    error: str | None = None
    on_first: list[int] = field(default_factory=list)  # pids to SIGUSR1 at the first byte
    serve_pid: int | None = None
    #: The serve process's CPU seconds at the first byte and at the end.
    cpu: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.last - self.first

    @property
    def serve_cpu_s(self) -> float:
        return self.cpu[1] - self.cpu[0] if len(self.cpu) == 2 else 0.0

    def start(self) -> None:
        self.first = time.monotonic()
        self.cpu = [_proc_cpu(self.serve_pid)]
        for pid in self.on_first:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    def finish(self) -> None:
        self.cpu.append(_proc_cpu(self.serve_pid))


def _proc_cpu(pid: int | None) -> float:
    """A process's user + system CPU seconds (all its threads), from /proc."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _count_into(conn: socket.socket, count: Count) -> None:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while n := conn.recv_into(view):
        if count.nbytes == 0:
            count.start()
        count.nbytes += n
        count.last = time.monotonic()
    count.finish()


def _listen_and_count(listener: socket.socket, count: Count) -> None:
    try:
        conn, _ = listener.accept()
        with conn:
            _count_into(conn, count)
    except OSError as err:
        count.error = repr(err)


def _connect_and_send(uds: str, nbytes: int, count: Count, deadline: float) -> None:
    """CONNECT 6000 (retrying until the guest listens), send, wait for the guest's close."""
    chunk = bytes(1 << 20)
    try:
        while time.monotonic() < deadline:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(max(1.0, deadline - time.monotonic()))
            try:
                c.connect(uds)
            except OSError:
                c.close()
                time.sleep(0.2)
                continue
            with c:
                c.sendall(f"CONNECT {H2G_PORT}\n".encode())
                line = b""
                while not line.endswith(b"\n") and (byte := c.recv(1)):
                    line += byte
                if not line.startswith(b"OK "):
                    time.sleep(0.2)  # not listening yet: the device answered RST
                    continue
                count.start()
                left = nbytes
                while left:
                    n = min(left, len(chunk))
                    c.sendall(chunk[:n])
                    left -= n
                c.shutdown(socket.SHUT_WR)
                while c.recv(1 << 16):  # the guest's socat exits at EOF: then we see EOF
                    pass
                count.last = time.monotonic()
                count.finish()
                count.nbytes = nbytes
                return
        count.error = "the guest never listened on port 6000"
    except OSError as err:
        count.error = repr(err)


#: Where a profiled serve process writes its report, for how long it profiles, and how.
Profile = tuple[Path, float, str]


@contextlib.contextmanager
def _serve(sock: Path, uds: str, log: Path, profile: Profile | None) -> Iterator[int]:
    """`virtio serve vsock`, optionally under this module's sampler; yields its pid."""
    serve = ["serve", "vsock", "--socket", str(sock), "--guest-cid", str(CID), "--uds-path", uds]
    if profile is None:
        cmd = [sys.executable, "-m", "virtio.cli", *serve]
    else:
        out, seconds, mode = profile
        cmd = [sys.executable, "-m", "virtio.bench.vsockguest", "--as-profiled-serve"]
        cmd += [str(out), str(seconds), mode, *serve]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=f, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"virtio serve vsock did not start: {log.read_text()}")
            time.sleep(0.05)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _unix_listener(path: str, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    s.settimeout(timeout)
    return s


def host_reference(tmp: Path, nbytes: int) -> float:
    """Gbit/s of the same socat pipeline into a host Unix socket (no guest, no device)."""
    path = str(tmp / "ref.sock")
    count = Count()
    with _unix_listener(path, 60) as listener:
        t = threading.Thread(target=_listen_and_count, args=(listener, count), daemon=True)
        t.start()
        cmd = ["socat", "-u", "-b", str(CHUNK), f"OPEN:/dev/zero,readbytes={nbytes}"]
        subprocess.run([*cmd, f"UNIX-CONNECT:{path}"], check=True, timeout=120)
        t.join(60)
    if count.error or count.nbytes != nbytes:
        raise RuntimeError(f"host reference moved {count.nbytes} of {nbytes}: {count.error}")
    return _gbit(count.nbytes, count.seconds)


@dataclass
class GuestRun:
    g2h: Count | None
    h2g: Count | None
    local_s: float
    result: GuestResult
    log: str


def guest_run(
    tmp: Path,
    nbytes: int,
    assets: GuestAssets,
    *,
    parts: tuple[str, ...] = ("local", "g2h", "h2g"),
    profile: Profile | None = None,
) -> GuestRun:
    """One UML guest: guest to host (and host to guest) through `virtio serve vsock`."""
    sock, uds, log = tmp / "vsock.sock", str(tmp / "uds"), tmp / "serve.log"
    for stale in (sock, Path(uds), Path(f"{uds}_{G2H_PORT}")):
        stale.unlink(missing_ok=True)
    timeout = 60 + nbytes / (1 << 20)  # generous: ~1 s a MiB would be a very slow device
    script = "".join(PARTS[part].format(socat=SOCAT, nbytes=nbytes) for part in parts)
    g2h_count = Count() if "g2h" in parts else None
    h2g_count = Count() if "h2g" in parts else None
    with (
        _serve(sock, uds, log, profile) as pid,
        _unix_listener(f"{uds}_{G2H_PORT}", timeout) as lis,
    ):
        peers = []
        for c in (g2h_count, h2g_count):
            if c is not None:
                c.serve_pid = pid
                if profile is not None:
                    c.on_first.append(pid)
        if g2h_count is not None:
            args = (lis, g2h_count)
            peers.append(threading.Thread(target=_listen_and_count, args=args, daemon=True))
        if h2g_count is not None:
            send = (uds, nbytes, h2g_count, time.monotonic() + timeout)
            peers.append(threading.Thread(target=_connect_and_send, args=send, daemon=True))
        for p in peers:
            p.start()
        result = run_guest(
            script,
            vm="uml",
            devices=[VhostUserDevice(str(sock), 19)],
            timeout=timeout,
            host_share=True,
            assets=assets,
        )
        for p in peers:
            p.join(10)
        if profile is not None:  # the sampler may outlast the traffic: keep serve up for it
            deadline = time.monotonic() + profile[1] + 10
            while not profile[0].exists() and time.monotonic() < deadline:
                time.sleep(0.1)
    text = log.read_text(errors="replace")
    out = result.section()
    context = f"{result.output[-2000:]}\n{text[-2000:]}"
    if not result.ok:
        raise RuntimeError(f"the guest failed:\n{context}")
    rcs = dict(re.findall(r"^(RC_\w+) (\d+)$", out, re.M))
    counts = [("g2h", g2h_count), ("h2g", h2g_count)]
    for name, c in counts:
        if c is None:
            continue
        if rcs.get(f"RC_{name.upper()}") != "0" or c.error or c.nbytes != nbytes:
            raise RuntimeError(f"{name}: {c.nbytes} of {nbytes} bytes, {c.error}\n{context}")
    local = re.search(r"^LOCAL (\d+\.\d+) (\d+\.\d+) 0$", out, re.M)
    local_s = float(local[2]) - float(local[1]) if local else 0.0
    return GuestRun(g2h_count, h2g_count, local_s, result, text)


# The profilers, inside the serve process (``--as-profiled-serve``).


def _cpu() -> float:
    """This process's user + system CPU seconds so far."""
    t = os.times()
    return t.user + t.system


def _sample(frames_of: int, seconds: float, out: Path, interval: float = 0.001) -> None:
    """Sample one thread's Python stack every ``interval`` s for ``seconds``; write JSON.

    A sample needs the GIL, so it lands where the sampled thread gives the GIL
    up: at blocking calls at once, in pure-Python stretches only at the switch
    interval. The counts overweight system calls; ``cprofile`` has the other bias.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    samples = 0
    cpu0, start = _cpu(), time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        frame: FrameType | None = sys._current_frames().get(frames_of)
        if frame is not None:
            samples += 1
            code = frame.f_code
            own[_where(code.co_name, code.co_filename, code.co_firstlineno)] += 1
            lines[f"{_short(code.co_filename)}:{frame.f_lineno} in {code.co_name}"] += 1
            seen: set[str] = set()
            while frame is not None:
                c = frame.f_code
                seen.add(_where(c.co_name, c.co_filename, c.co_firstlineno))
                frame = frame.f_back
            inclusive.update(seen)
        time.sleep(interval)
    report = {
        "profiler": "sample",
        "samples": samples,
        "seconds": seconds,
        "cpu_percent": round(100 * (_cpu() - cpu0) / (time.monotonic() - start), 1),
        "self": own.most_common(25),
        "inclusive": inclusive.most_common(25),
        "lines": lines.most_common(25),
    }
    out.write_text(json.dumps(report, indent=1))


def _where(name: str, filename: str, line: int) -> str:
    return f"{name} ({_short(filename)}:{line})"


def _short(path: str) -> str:
    marker = "/src/virtio/"
    return "virtio/" + path.split(marker, 1)[1] if marker in path else path.rsplit("/", 2)[-1]


def _cprofile_report(prof: cProfile.Profile, seconds: float, cpu: float) -> dict[str, object]:
    stats = pstats.Stats(prof)
    rows = []
    # pstats keeps (file, line, name) -> (primitive calls, calls, tottime, cumtime, callers).
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in raw.items():
        rows.append([_where(name, filename, line), calls, round(tottime, 4), round(cumtime, 4)])
    rows.sort(key=lambda r: -float(str(r[2])))
    return {
        "profiler": "cprofile",
        "seconds": seconds,
        "cpu_percent": round(100 * cpu / seconds, 1),
        "tottime": rows[:30],
    }


def _profiled_serve(argv: list[str]) -> int:
    """``OUT SECONDS MODE serve ...``: the CLI, profiled for SECONDS from SIGUSR1."""
    out, seconds, mode, rest = Path(argv[0]), float(argv[1]), argv[2], argv[3:]
    main_ident = threading.main_thread().ident
    assert main_ident is not None
    started = threading.Event()
    prof = cProfile.Profile()
    cpu0 = [0.0]

    def start(_signum: int, _frame: FrameType | None) -> None:
        if started.is_set():
            return
        started.set()
        if mode == "sample":
            args = (main_ident, seconds, out)
            threading.Thread(target=_sample, args=args, daemon=True).start()
            return
        # cProfile follows the thread that enables it: the handlers run on the main thread.
        cpu0[0] = _cpu()
        prof.enable()
        timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGUSR2))
        timer.daemon = True
        timer.start()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        prof.disable()
        report = _cprofile_report(prof, seconds, _cpu() - cpu0[0])
        out.write_text(json.dumps(report, indent=1))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from virtio.cli import main as cli_main

    return cli_main(rest)


def _profile(
    tmp: Path, assets: GuestAssets, direction: str, mode: str, seconds: float, rate_gbit: float
) -> dict[str, object]:
    """Profile the serve process for ``seconds`` of one direction's traffic."""
    # Enough data to outlast the window at the rate just measured, plus slack.
    nbytes = int(max(rate_gbit, 0.05) * 1e9 / 8 * (seconds + 5))
    nbytes = max(64 << 20, min(nbytes, 16 << 30)) // CHUNK * CHUNK
    out = tmp / f"profile-{direction}-{mode}.json"
    run = guest_run(tmp, nbytes, assets, parts=(direction,), profile=(out, seconds, mode))
    count = run.g2h if direction == "g2h" else run.h2g
    assert count is not None
    if not out.exists():
        raise RuntimeError("the profiled serve process wrote no report")
    report: dict[str, object] = json.loads(out.read_text())
    report["gbit_s_while_profiled"] = round(_gbit(count.nbytes, count.seconds), 3)
    report["traffic_seconds"] = round(count.seconds, 3)
    report["nbytes"] = nbytes
    return report


def main(argv: list[str]) -> int:
    if argv[:1] == ["--as-profiled-serve"]:
        return _profiled_serve(argv[1:])
    p = argparse.ArgumentParser(prog="virtio bench vsock-guest", description=__doc__)
    p.add_argument("--mib", type=int, default=256, help="MiB each way (default 256)")
    p.add_argument("--runs", type=int, default=3, help="guest boots; the median (default 3)")
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="S",
        help="then profile the serve process for S seconds of traffic each way",
    )
    p.add_argument(
        "--profiler",
        choices=["sample", "cprofile", "both"],
        default="both",
        help="a stack sampler (all the time, no slow-down, biased to system calls), "
        "cProfile (call counts, slows Python code), or both (default)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.mib < 1 or args.runs < 1:
        p.error("--mib and --runs must be at least 1")
    nbytes = args.mib << 20
    out: dict[str, object] = {"mib": args.mib, "runs": args.runs}
    rates: dict[str, list[float]] = {"g2h": [], "h2g": [], "guest_local": []}
    cpu: dict[str, list[float]] = {"g2h": [], "h2g": []}
    try:
        assets = prepare()
        with tempfile.TemporaryDirectory(prefix="pyvirtio-vsockbench-") as name:
            tmp = Path(name)
            out["host_unix_gbit_s"] = round(host_reference(tmp, nbytes), 3)
            for _ in range(args.runs):
                run = guest_run(tmp, nbytes, assets)
                assert run.g2h is not None and run.h2g is not None
                rates["g2h"].append(_gbit(nbytes, run.g2h.seconds))
                rates["h2g"].append(_gbit(nbytes, run.h2g.seconds))
                rates["guest_local"].append(_gbit(nbytes, run.local_s))
                cpu["g2h"].append(run.g2h.serve_cpu_s / (nbytes / (1 << 30)))
                cpu["h2g"].append(run.h2g.serve_cpu_s / (nbytes / (1 << 30)))
            for key, values in rates.items():
                out[f"{key}_gbit_s"] = round(statistics.median(values), 3)
                out[f"{key}_all"] = [round(v, 3) for v in values]
            for key, values in cpu.items():
                # Less at the mercy of a busy machine than a rate: what a GiB costs serve.
                out[f"{key}_serve_cpu_s_per_gib"] = round(statistics.median(values), 3)
            if args.profile > 0:
                modes = ["sample", "cprofile"] if args.profiler == "both" else [args.profiler]
                profiles = {}
                for direction in ("g2h", "h2g"):
                    rate = statistics.median(rates[direction])
                    for mode in modes:
                        key = f"{direction}_{mode}"
                        profiles[key] = _profile(tmp, assets, direction, mode, args.profile, rate)
                out["profile"] = profiles
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as err:
        print(f"virtio bench vsock-guest: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
        return 0
    _table(out)
    return 0


def _table(out: dict[str, object]) -> None:
    head = f"path ({out['mib']} MiB, socat -b {CHUNK}; median of {out['runs']})"
    print(f"| {head} | Gbit/s | runs | serve CPU s / GiB |")
    print("| --- | ---: | --- | ---: |")
    rows = [
        ("UML guest to host, `virtio serve vsock`", "g2h"),
        ("host to UML guest, `virtio serve vsock`", "h2g"),
        ("reference: socat /dev/zero to /dev/null inside UML", "guest_local"),
    ]
    for title, key in rows:
        cost = out.get(f"{key}_serve_cpu_s_per_gib", "")
        print(f"| {title} | {out[f'{key}_gbit_s']} | {out[f'{key}_all']} | {cost} |")
    print(f"| reference: host socat to a host Unix socket | {out['host_unix_gbit_s']} | | |")
    print("| C vhost-user vsock back-end (vhost-device-vsock) | not packaged in Debian 12 | | |")
    profiles = out.get("profile")
    if not isinstance(profiles, dict):
        return
    for key, profile in profiles.items():
        print(
            f"\nserve process, {key}: {profile['seconds']} s at {profile['cpu_percent']}% CPU "
            f"({profile['gbit_s_while_profiled']} Gbit/s meanwhile)"
        )
        if profile["profiler"] == "sample":
            print(f"{profile['samples']} samples")
            for title in ("self", "lines"):
                print(f"\n| {title} | samples |\n| --- | ---: |")
                for where, n in profile[title][:12]:
                    print(f"| `{where}` | {n} |")
        else:
            print("\n| function | calls | tottime s | cumtime s |\n| --- | ---: | ---: | ---: |")
            for where, calls, tottime, cumtime in profile["tottime"][:20]:
                print(f"| `{where}` | {calls} | {tottime} | {cumtime} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
