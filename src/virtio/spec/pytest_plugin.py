"""pytest plugin: a record of which tests ran, passed and asserted, for `virtio spec-coverage`.

pyproject.toml loads it for every run of the project's tests (``-p virtio.spec.pytest_plugin``).
At the end of the session it writes one JSON file, ``$PYVIRTIO_TEST_RECORD`` or else
``<rootdir>/.pyvirtio/test-record.json`` (atomically: a temporary file, then a rename), with
one entry per test item: its node id, its outcome (``passed`` only if setup, call and
teardown all passed), the ids of its ``normative`` markers (module ``pytestmark`` ones too)
and how many ``assert`` statements passed during its call.

Counting assertions
    With the ini option ``enable_assertion_pass_hook = true``, pytest's assertion rewriting
    gives every rewritten ``assert`` a "passed" branch: it calls
    ``_pytest.assertion.rewrite._check_if_assertion_pass_impl()`` and, only when that says a
    ``pytest_assertion_pass`` hook is implemented, builds the whole failure explanation
    (``repr`` of every operand, ``pytest_assertrepr_compare`` diffs of bytes and lists) to
    pass it to the hook. Implementing the hook made ``tests/queue`` + ``tests/core`` about
    20 times slower (they assert inside 70,000-iteration loops). So this plugin does not
    implement the hook: it wraps that check function, counts one passing assertion per call
    and returns what the original returns (other plugins' hooks still work). Should a pytest
    release drop the function, the plugin falls back to the public, slow hook.

    pytest caches rewritten modules in ``__pycache__/<name>.<tag>-pytest-<version>.pyc``,
    keyed by the source alone, not by that ini option: a module cached before the option was
    set would count nothing. While the option is on, the plugin names the cached files
    ``...-passcount.pyc`` instead, so the two kinds never mix.

Assertions only count in modules pytest rewrites: test modules, ``conftest.py`` files and
modules registered with ``pytest.register_assert_rewrite``. Under pytest-xdist the plugin
does nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from virtio.spec.coverage import RECORD_FORMAT, default_record_path

OUTCOMES = ("passed", "failed", "skipped", "error", "not run")
_PYC_MARK = "-passcount"


@dataclass
class _Entry:
    nodeid: str
    normative: list[str]
    phases: dict[str, str] = field(default_factory=dict)  # setup/call/teardown -> outcome
    xfail: bool = False
    assertions: int = 0  # passed during the call
    fixture_assertions: int = 0  # passed during setup and teardown

    def outcome(self) -> str:
        setup = self.phases.get("setup")
        call = self.phases.get("call")
        teardown = self.phases.get("teardown")
        if setup is None:
            return "not run"
        if setup == "failed":
            return "error"
        if "skipped" in (setup, call) or self.xfail:
            return "skipped"  # xfail and xpass too: they prove nothing either way
        if call == "failed":
            return "failed"
        if teardown == "failed":
            return "error"
        if setup == call == teardown == "passed":
            return "passed"
        return "not run"  # interrupted, or --setup-only

    def as_json(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "outcome": self.outcome(),
            "normative": self.normative,
            "assertions": self.assertions,
            "fixture_assertions": self.fixture_assertions,
        }


class _Tally:
    """Passing assertions of one test phase."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


# The tally of the test phase running now in this process, or None. Nested sessions
# (pytester's in-process runs) save and restore it around each phase: an assertion counts
# for the innermost test.
_current: _Tally | None = None


def _no_pass_hook() -> bool:
    return False


# The cheap counter: wrap the check every passing rewritten assert calls (kept short: it
# runs once per passing assert). Installed once per process however many sessions nest.
_installs = 0
_original_check: Callable[[], bool] = _no_pass_hook


def _counting_check() -> bool:
    tally = _current
    if tally is not None:
        tally.n += 1
    return _original_check()


def _install_counting_check() -> bool:
    """Wrap the check of rewritten asserts; False if this pytest has no such function."""
    global _installs, _original_check
    from _pytest.assertion import rewrite

    if _installs == 0:
        original = getattr(rewrite, "_check_if_assertion_pass_impl", None)
        if not callable(original):
            return False
        _original_check = original
        rewrite._check_if_assertion_pass_impl = _counting_check
    _installs += 1
    return True


def _uninstall_counting_check() -> None:
    global _installs, _original_check
    from _pytest.assertion import rewrite

    _installs -= 1
    if _installs == 0:
        rewrite._check_if_assertion_pass_impl = _original_check
        _original_check = _no_pass_hook


class _PassHook:
    """Fallback counter: the public pytest_assertion_pass hook (slow, see the module doc)."""

    def pytest_assertion_pass(self, item: pytest.Item, lineno: int, orig: str, expl: str) -> None:
        if _current is not None:
            _current.n += 1


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary file next to path, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Recorder:
    """The per-session part of the plugin, registered by pytest_configure."""

    def __init__(self, config: pytest.Config, path: Path, counting: str) -> None:
        self.config = config
        self.path = path
        self.counting = counting  # "check-wrapper", "pytest_assertion_pass" or "off"
        self.started = time.time()
        self.entries: dict[str, _Entry] = {}
        self.collection_errors: list[str] = []
        self.written = False

    def _entry(self, nodeid: str) -> _Entry:
        entry = self.entries.get(nodeid)
        if entry is None:  # an item that was not in the collection (should not happen)
            entry = self.entries[nodeid] = _Entry(nodeid, [])
        return entry

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collection_errors.append(report.nodeid)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            ids: list[str] = []
            for mark in item.iter_markers("normative"):  # closest first: function, module
                for arg in mark.args:
                    if isinstance(arg, str) and arg not in ids:
                        ids.append(arg)
            self.entries[item.nodeid] = _Entry(item.nodeid, ids)

    def _phase(self, item: pytest.Item, when: str) -> Generator[None, object, object]:
        global _current
        entry = self._entry(item.nodeid)
        saved, tally = _current, _Tally()
        _current = tally
        try:
            return (yield)
        finally:
            _current = saved
            if when == "call":
                entry.assertions += tally.n
            else:
                entry.fixture_assertions += tally.n

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, object, object]:
        return (yield from self._phase(item, "setup"))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        return (yield from self._phase(item, "call"))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, object, object]:
        return (yield from self._phase(item, "teardown"))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self._entry(report.nodeid)
        entry.phases[report.when] = report.outcome
        if hasattr(report, "wasxfail"):
            entry.xfail = True

    def record(self, exitstatus: int) -> dict[str, Any]:
        tests = [e.as_json() for e in self.entries.values()]
        counts = dict.fromkeys(OUTCOMES, 0)
        for t in tests:
            counts[t["outcome"]] += 1
        finished = time.time()
        return {
            "format": RECORD_FORMAT,
            "time": _utc(finished),
            "started": _utc(self.started),
            "duration_s": round(finished - self.started, 3),
            "rootdir": str(self.config.rootpath),
            "args": [str(a) for a in self.config.invocation_params.args],
            "python": platform.python_version(),
            "pytest": pytest.__version__,
            "assertion_counting": self.counting,
            "exitstatus": int(exitstatus),
            "counts": {"tests": len(tests), **counts},
            "collection_errors": self.collection_errors,
            "tests": tests,
        }

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.config.option.collectonly:
            return  # nothing ran: keep the record of the last run that did
        try:
            write_atomically(self.path, self.record(exitstatus))
        except OSError as e:
            print(f"pyvirtio: could not write the test record {self.path}: {e}", file=sys.stderr)
            return
        self.written = True

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.written:
            return
        note = ""
        if self.counting == "off":
            note = " (assertions not counted: set enable_assertion_pass_hook = true)"
        terminalreporter.write_line(f"pyvirtio test record: {self.path}{note}")


_recorder_key = pytest.StashKey[Recorder]()
_pyc_tail_key = pytest.StashKey[str]()


def _xdist(config: pytest.Config) -> bool:
    """A pytest-xdist worker, or a controller handing tests out to workers."""
    return hasattr(config, "workerinput") or getattr(config.option, "dist", "no") != "no"


def _hook_enabled(config: pytest.Config) -> bool:
    return bool(config.getini("enable_assertion_pass_hook"))


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Before any conftest or test module is rewritten: keep hook-enabled pycs apart."""
    from _pytest.assertion import rewrite

    tail = getattr(rewrite, "PYC_TAIL", None)
    ext = getattr(rewrite, "PYC_EXT", None)
    if not (isinstance(tail, str) and isinstance(ext, str) and tail.endswith(ext)):
        return
    plain = tail.removesuffix(ext).removesuffix(_PYC_MARK) + ext  # a nested session's
    wanted = plain.removesuffix(ext) + _PYC_MARK + ext if _hook_enabled(early_config) else plain
    if wanted != tail:
        early_config.stash[_pyc_tail_key] = tail
        rewrite.PYC_TAIL = wanted


def pytest_configure(config: pytest.Config) -> None:
    if _xdist(config):
        return
    path = default_record_path(config.rootpath)  # $PYVIRTIO_TEST_RECORD wins
    counting = "off"
    if _hook_enabled(config):
        if _install_counting_check():
            counting = "check-wrapper"
        else:
            config.pluginmanager.register(_PassHook(), "pyvirtio-assertion-pass")
            counting = "pytest_assertion_pass"
    recorder = Recorder(config, path, counting)
    config.stash[_recorder_key] = recorder
    config.pluginmanager.register(recorder, "pyvirtio-test-record")


def pytest_unconfigure(config: pytest.Config) -> None:
    recorder = config.stash.get(_recorder_key, None)
    if recorder is not None and recorder.counting == "check-wrapper":
        _uninstall_counting_check()
    tail = config.stash.get(_pyc_tail_key, None)
    if tail is not None:
        from _pytest.assertion import rewrite

        rewrite.PYC_TAIL = tail
