"""A full memory fence (store-load barrier) callable from Python.

Why: with VIRTIO_F_EVENT_IDX each end of a ring shared with another process
does "store my index, then load the peer's event index" and "store my event
index, then load the peer's index again". Both x86 (store buffer) and ARM may
let the load pass the earlier store; then both ends can decide the other will
notify and go to sleep: a lost wake-up. Linux puts ``virtio_mb()`` there,
rust-vmm's virtio-queue ``fence(Ordering::SeqCst)``. :func:`full_fence` is that
barrier: every load and store before the call is ordered before every load and
store after it, as seen by other CPUs.

``full_fence`` is bound once, at import, to the cheapest implementation that
works here; :data:`FENCE_METHOD` names it. Importing never fails: each
candidate that cannot be built (no ctypes, executable memory refused, unknown
architecture) is skipped. In preference order:

``"x86_64-lock-add"``
    x86_64 machine code ``lock addl $0,-4(%rsp); ret`` (``F0 83 44 24 FC 00 C3``),
    Linux's ``smp_mb()`` since 4.15. A locked read-modify-write drains the
    store buffer and no load passes it (Intel SDM vol. 3A, "Memory Ordering in
    P6 and More Recent Processor Families": "locked instructions have a total
    order", "reads or writes cannot be reordered with ... locked
    instructions"); it is cheaper than ``mfence``, which Linux dropped for it.
``"aarch64-dmb-ish"``
    AArch64 machine code ``dmb ish; ret`` (words ``D5033BBF D65F03C0``), Linux's
    ``smp_mb()`` and what Rust's ``fence(SeqCst)`` compiles to: a data memory
    barrier over the inner shareable domain orders all earlier loads and stores
    before all later ones.

    The code sits in a page called through ``ctypes.PYFUNCTYPE`` (which keeps
    the GIL: releasing it would cost more than the fence). The page comes from
    a memfd written with ``write(2)`` and mapped read+execute, never writable
    and executable at once, so W^X policies allow it and the kernel does the
    instruction-cache maintenance AArch64 needs when it maps the page. Failing
    that, on x86_64 only, an anonymous page is written and then ``mprotect``-ed
    read+execute (x86 keeps instruction fetch coherent with data writes). The
    mapping must show up executable in ``/proc/self/maps`` before the code is
    ever called, so a policy that silently drops PROT_EXEC cannot crash the
    import. Only on Linux, in 64-bit processes.
``"lock-rmw"`` (x86, x86_64, s390x without executable memory)
    ``_thread.allocate_lock().acquire()``. CPython 3.11 on Linux implements
    ``_thread.lock`` with a POSIX semaphore (``USE_SEMAPHORES``): an uncontended
    ``acquire()`` is ``sem_trywait`` and ``release()`` is ``sem_post``, each one
    ``lock cmpxchg`` in glibc 2.36 (checked with gdb on this machine); the
    non-semaphore build uses ``pthread_mutex_lock``/``unlock``, also locked
    instructions. Any locked instruction is a full barrier on x86, and
    COMPARE AND SWAP serializes on s390x. The lock is a fresh one each call
    (freeing it releases it: a second locked instruction), so nothing is
    shared between threads, signal handlers or forked children that could
    block. Beware ``acquire(False)`` on a held lock: it fails with a plain load
    and no barrier.
``"lock-release-acquire"`` (ARMv8/AArch64, 32-bit ARM, RISC-V)
    ``lock.acquire(); lock.release(); lock.acquire()`` on a fresh lock. An
    acquire/release *pair* is not a full fence there: glibc's ``sem_trywait`` is
    an acquire CAS and ``sem_post`` a release CAS, and an earlier store and a
    later load may both move inside the pair and pass each other. A release
    followed in program order by an acquire is ordered (ARMv8 release/acquire
    are RCsc: ``[L]; po; [A]`` is barrier-ordered-before; RVWMO's .aq/.rl are
    RCsc too; 32-bit ARM atomics carry ``dmb`` instructions), so: earlier
    accesses -> release -> acquire -> later accesses.
``"futex-wake"`` (Linux on other architectures, e.g. POWER)
    ``syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1)`` through ctypes. The
    kernel executes ``smp_mb()`` before it looks for waiters (barrier "B" of
    kernel/futex/waitwake.c, Linux >= 3.14), a full barrier on every
    architecture. On POWER lock operations use ``lwsync``, which does not order
    a store before a later load, so the lock methods are not enough there.
``"lock-release-acquire-unverified"``
    The last resort elsewhere: the release/acquire sequence, which is a full
    fence only where release/acquire are RCsc.

Cost per call on the development machine (Intel Xeon VM, 2 vCPUs, CPython
3.11.7, glibc 2.36; ``timeit``, 7 runs of 200,000 calls, minimum/median):

=======================================================  ==========
``x86_64-lock-add`` (the default here)                     51/52 ns
the same code through ``CFUNCTYPE`` (drops the GIL)        95/97 ns
``mfence; ret``                                            69/73 ns
``ret`` alone through ``PYFUNCTYPE`` (call overhead)       51/55 ns
an empty Python function                                   24/25 ns
``lock-rmw``                                             154/164 ns
a shared lock's ``acquire(); release()``                 116/117 ns
``acquire(False); release()`` (argument parsing)         291/295 ns
``lock-release-acquire``                                 244/247 ns
``futex-wake``                                           899/915 ns
``os.sched_yield()`` (a kernel side effect, no promise)  277/278 ns
=======================================================  ==========

The locked add hides in the ctypes call overhead. A shared lock is not used:
a signal handler, another thread or a forked child could find it held and block.
``virtio.queue.fence.measure()`` measures again.

Evidence it is needed and works: a store-buffer litmus test between two
processes pinned to the two CPUs (``x = r; r0 = y`` against ``y = r; r1 = x``
through a shared memfd) saw both loads stale, which sequential consistency
forbids, 1,518 times in 2,000,000 rounds with the store and the load adjacent
in Python, and never in 2,000,000 rounds with ``full_fence()`` between them
(nor in 300,000 rounds with each other implementation). Racing the split
ring's ``enable_notifications()`` against ``add()`` + ``kick_needed()`` the same
way lost the kick 54 to 663 times per 1,000,000 rounds without the fences, and
never with them. (About 50 ns of anything between the store and the load, even
a ctypes call to a bare ``ret``, also hid it on this CPU; nothing promises that.)
"""

from __future__ import annotations

import _thread
import mmap
import os
import struct
import sys
from collections.abc import Callable

__all__ = ["FENCE_METHOD", "full_fence", "implementations", "measure"]

Fence = Callable[[], None]

_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "aarch64_be": "aarch64"}
# Where every locked/interlocked read-modify-write is a full barrier.
_RMW_IS_FULL_BARRIER = {"x86_64", "i386", "i486", "i586", "i686", "x86", "s390x"}
# Where a store-release followed by a load-acquire is ordered (RCsc).
_RELEASE_ACQUIRE_IS_ORDERED_PREFIXES = ("aarch64", "arm", "riscv")
# SYS_futex by architecture (Linux).
_SYS_FUTEX = {
    "x86_64": 202,
    "aarch64": 98,
    "riscv64": 98,
    "loongarch64": 98,
    "ppc64": 221,
    "ppc64le": 221,
    "ppc": 221,
    "s390x": 238,
}
_FUTEX_WAKE_PRIVATE = 1 | 128

_CODE: dict[str, tuple[str, bytes]] = {
    "x86_64": ("x86_64-lock-add", b"\xf0\x83\x44\x24\xfc\x00\xc3"),  # lock addl $0,-4(%rsp); ret
    "aarch64": ("aarch64-dmb-ish", struct.pack("<2I", 0xD5033BBF, 0xD65F03C0)),  # dmb ish; ret
}
# Only for comparison (implementations()): mfence; ret.
_X86_MFENCE = b"\x0f\xae\xf0\xc3"


def _machine() -> str:
    try:
        name = os.uname().machine.lower()
    except AttributeError:  # Windows
        name = os.environ.get("PROCESSOR_ARCHITECTURE", "").lower()
    return _MACHINE_ALIASES.get(name, name)


_ARCH = _machine()


# -- machine code in an executable page -----------------------------------------


def _mapped_executable(addr: int, length: int) -> bool:
    """Whether [addr, addr+length) lies in one mapping that /proc/self/maps says is executable."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split(None, 2)[:2]
            lo, _, hi = span.partition("-")
            if int(lo, 16) <= addr and addr + length <= int(hi, 16):
                return perms[2:3] == "x"
    return False


def _code_page(code: bytes, *, allow_anonymous: bool) -> int | None:
    """Map ``code`` read+execute and return its address, or None where that is refused."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    c_mmap = libc.mmap
    c_mmap.restype = ctypes.c_void_p
    c_mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    c_munmap = libc.munmap
    c_munmap.restype = ctypes.c_int
    c_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    failed = ctypes.c_void_p(-1).value
    rx = mmap.PROT_READ | mmap.PROT_EXEC

    def usable(addr: int | None) -> int | None:
        if addr is None or addr == failed:
            return None
        if _mapped_executable(addr, len(code)):
            return addr
        c_munmap(addr, page)
        return None

    # A memfd filled by write(2), then mapped r-x: never writable and executable.
    fd = -1
    try:
        try:
            fd = os.memfd_create("virtio-fence", os.MFD_CLOEXEC | getattr(os, "MFD_EXEC", 0x10))
        except OSError:  # kernels before 6.3 do not know MFD_EXEC
            fd = os.memfd_create("virtio-fence", os.MFD_CLOEXEC)
        os.write(fd, code)
        os.ftruncate(fd, page)
        addr = usable(c_mmap(None, page, rx, mmap.MAP_PRIVATE, fd, 0))
        if addr is not None:
            return addr
    except OSError:
        pass
    finally:
        if fd >= 0:
            os.close(fd)
    if not allow_anonymous:
        return None
    # An anonymous page written, then made r-x (refused under SELinux execmem or PaX).
    anon = c_mmap(
        None, page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0
    )
    if anon is None or anon == failed:
        return None
    ctypes.memmove(anon, code, len(code))
    c_mprotect = libc.mprotect
    c_mprotect.restype = ctypes.c_int
    c_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if c_mprotect(anon, page, rx) != 0:
        c_munmap(anon, page)
        return None
    return usable(anon)


def _code_fence(code: bytes) -> Fence | None:
    """A callable running ``code`` (a function of no arguments), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    if ctypes.sizeof(ctypes.c_void_p) != 8:  # a 32-bit process on a 64-bit kernel
        return None
    # Only x86 fetches instructions coherently with the data writes of the anonymous route.
    addr = _code_page(code, allow_anonymous=_ARCH == "x86_64")
    if addr is None:
        return None
    fence: Fence = ctypes.PYFUNCTYPE(None)(addr)
    fence()
    return fence


# -- through the C runtime's atomics ------------------------------------------------

_allocate_lock = _thread.allocate_lock
# Objects the fences point into (the futex word).
_KEEP_ALIVE: list[object] = []


def _lock_rmw_fence() -> None:
    """One uncontended lock acquire (a locked CAS), and the release when it is freed."""
    _allocate_lock().acquire()


def _lock_release_acquire_fence() -> None:
    """A release followed by an acquire: ordered where release/acquire are RCsc."""
    lock = _allocate_lock()
    lock.acquire()
    lock.release()
    lock.acquire()


def _futex_fence() -> Fence | None:
    number = _SYS_FUTEX.get(_ARCH)
    if number is None or not sys.platform.startswith("linux"):
        return None
    import ctypes

    word = ctypes.c_uint32(0)
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long
    syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    addr = ctypes.addressof(word)

    def fence() -> None:
        syscall(number, addr, _FUTEX_WAKE_PRIVATE, 1)

    if syscall(number, addr, _FUTEX_WAKE_PRIVATE, 1) != 0:
        return None
    _KEEP_ALIVE.append(word)
    return fence


# -- selection ----------------------------------------------------------------------


def _candidates() -> list[tuple[str, Callable[[], Fence | None]]]:
    """(name, builder) in preference order for this architecture."""
    out: list[tuple[str, Callable[[], Fence | None]]] = []
    if _ARCH in _CODE:
        name, code = _CODE[_ARCH]
        out.append((name, lambda: _code_fence(code)))
    if _ARCH in _RMW_IS_FULL_BARRIER:
        out.append(("lock-rmw", lambda: _lock_rmw_fence))
    if _ARCH.startswith(_RELEASE_ACQUIRE_IS_ORDERED_PREFIXES):
        out.append(("lock-release-acquire", lambda: _lock_release_acquire_fence))
    out.append(("futex-wake", _futex_fence))
    return out


def _select() -> tuple[str, Fence]:
    for name, build in _candidates():
        try:
            fence = build()
        except Exception:  # ctypes missing, mapping refused, ...: the next one
            continue
        if fence is not None:
            return name, fence
    return "lock-release-acquire-unverified", _lock_release_acquire_fence


def implementations() -> dict[str, Fence]:
    """Every implementation that is a full fence here and can be built, by name.

    For measurements and tests. Besides the selection chain this includes
    ``"x86_64-mfence"`` on x86_64 and ``"lock-release-acquire"`` wherever
    ``"lock-rmw"`` is valid. Each call maps new code pages; they are never unmapped.
    """
    out: dict[str, Fence] = {}
    for name, build in _candidates():
        try:
            fence = build()
        except Exception:
            continue
        if fence is not None:
            out[name] = fence
    if _ARCH == "x86_64":
        try:
            mfence = _code_fence(_X86_MFENCE)
        except Exception:
            mfence = None
        if mfence is not None:
            out["x86_64-mfence"] = mfence
    if _ARCH in _RMW_IS_FULL_BARRIER:
        out["lock-release-acquire"] = _lock_release_acquire_fence
    return out


FENCE_METHOD: str
full_fence: Fence
FENCE_METHOD, full_fence = _select()


def measure(number: int = 200_000, repeat: int = 7) -> dict[str, tuple[float, float]]:
    """Nanoseconds per call of every implementation here: (minimum, median) of ``repeat`` runs."""
    import statistics
    import timeit

    out: dict[str, tuple[float, float]] = {}
    for name, fence in implementations().items():
        runs = [timeit.timeit(fence, number=number) / number * 1e9 for _ in range(repeat)]
        out[name] = (min(runs), statistics.median(runs))
    return out


if __name__ == "__main__":
    print(f"machine {_ARCH}, FENCE_METHOD = {FENCE_METHOD!r}")
    for name, (low, median) in measure().items():
        print(f"  {name:24} min {low:7.1f} ns  median {median:7.1f} ns per call")
