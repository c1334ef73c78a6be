"""`virtio spec-coverage` counts what ran: the test-record plugin and the report built on it.

These check our tool, not the spec, so they carry no normative markers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from virtio.spec.coverage import RECORD_ENV, RECORD_FORMAT, main
from virtio.spec.data_files import load
from virtio.spec.normative import blocks

pytest_plugins = ["pytester"]

# Real ids, one per role in the inner test file below.
IDS = list(blocks())[:6]
PASSED, FAILED, SKIPPED, EMPTY, ERROR, SHARED = IDS

INI = """\
[pytest]
addopts = -p virtio.spec.pytest_plugin
enable_assertion_pass_hook = true
markers =
    normative(*ids): normative blocks
"""

CONFTEST = """\
import pytest

def check_small(x):
    assert x >= 0
    assert x < 100

@pytest.fixture
def checked():
    assert True
    yield 7
    assert True

@pytest.fixture
def broken():
    raise RuntimeError("fixture fails")
"""

TESTS = f"""\
import pytest
from conftest import check_small

pytestmark = pytest.mark.normative({SHARED!r})

@pytest.mark.normative({PASSED!r})
def test_passes(checked):
    for i in range(5):
        assert i < 10
    check_small(checked)

@pytest.mark.normative({FAILED!r})
def test_fails():
    assert 1 + 1 == 2
    assert 1 + 1 == 3

@pytest.mark.normative({SKIPPED!r})
def test_skipped():
    pytest.skip("not here")

@pytest.mark.normative({EMPTY!r})
def test_asserts_nothing():
    x = 1 + 1

@pytest.mark.normative({ERROR!r})
def test_setup_error(broken):
    assert broken

@pytest.mark.normative({PASSED!r})
@pytest.mark.xfail(reason="known bad")
def test_xfail():
    assert False

def test_untagged():
    assert "a" in "abc"
"""


def _must(block_id: str) -> int:
    """MUST + MUST NOT of a block, straight from normative.json."""
    for raw in load("normative.json")["blocks"]:
        if raw["id"] == block_id:
            return int(raw["keywords"]["MUST"]) + int(raw["keywords"]["MUST_NOT"])
    raise KeyError(block_id)


@pytest.fixture
def record(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The record an inner pytest run of TESTS writes."""
    path = pytester.path / "out" / "record.json"
    monkeypatch.setenv(RECORD_ENV, str(path))
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=TESTS)
    result = pytester.runpytest()
    result.assert_outcomes(passed=3, failed=1, skipped=1, errors=1, xfailed=1)
    result.stdout.fnmatch_lines([f"pyvirtio test record: {path}"])
    data: dict[str, Any] = json.loads(path.read_text())
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]  # no temp file left
    data["_path"] = str(path)
    return data


def _by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["nodeid"].split("::")[-1]: t for t in data["tests"]}


def test_the_record_of_a_real_run(record: dict[str, Any]) -> None:
    assert record["format"] == RECORD_FORMAT
    assert record["assertion_counting"] == "check-wrapper"
    assert record["time"].endswith("+00:00")
    assert record["exitstatus"] == 1
    assert record["counts"] == {
        "tests": 7,
        "passed": 3,
        "failed": 1,
        "skipped": 2,  # a skip and an xfail
        "error": 1,
        "not run": 0,
    }
    tests = _by_name(record)
    assert {name: t["outcome"] for name, t in tests.items()} == {
        "test_passes": "passed",
        "test_fails": "failed",
        "test_skipped": "skipped",
        "test_asserts_nothing": "passed",
        "test_setup_error": "error",
        "test_xfail": "skipped",
        "test_untagged": "passed",
    }
    assert tests["test_passes"]["nodeid"] == "test_inner.py::test_passes"
    # The function's marker first, then the module's pytestmark.
    assert tests["test_passes"]["normative"] == [PASSED, SHARED]
    assert tests["test_untagged"]["normative"] == [SHARED]
    # 5 asserts in the loop, 2 in conftest's helper; the fixture's 2 are setup and teardown.
    assert tests["test_passes"]["assertions"] == 7
    assert tests["test_passes"]["fixture_assertions"] == 2
    assert tests["test_fails"]["assertions"] == 1  # the one before the failing one
    assert tests["test_asserts_nothing"]["assertions"] == 0
    assert tests["test_skipped"]["assertions"] == 0
    assert tests["test_untagged"]["assertions"] == 1


def test_only_passing_tests_with_assertions_cover(
    record: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--record", record["_path"], "--json", "--list-missing"]) == 0
    data = json.loads(capsys.readouterr().out)
    missing = set(data["missing"])
    assert PASSED not in missing
    assert SHARED not in missing  # cited (by pytestmark) by tests that passed with asserts
    for not_covering in (FAILED, SKIPPED, EMPTY, ERROR):
        assert not_covering in missing
    assert data["covered"] == 2
    assert data["total"] == len(blocks()) == 309
    assert data["must_covered"] == _must(PASSED) + _must(SHARED)
    assert data["must_covered"] > 0
    assert data["empty_tests"] == [
        {"nodeid": "test_inner.py::test_asserts_nothing", "normative": [EMPTY, SHARED]}
    ]
    assert data["unknown"] == []
    assert data["record"]["passed"] == 3
    assert data["record"]["failed"] == 1
    rows = {(r["group"], r["area"]): r for r in data["areas"]}
    first = blocks()[PASSED]
    row = rows[(first.area_group, first.area)]
    assert row["driver_covered"] + row["device_covered"] >= 1


def test_the_text_report_ends_with_blocks_and_musts(
    record: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--record", record["_path"], "--list-empty"]) == 0
    lines = capsys.readouterr().out.splitlines()
    raw = load("normative.json")["blocks"]
    must_total = sum(b["keywords"]["MUST"] + b["keywords"]["MUST_NOT"] for b in raw)
    assert must_total == 1383
    assert lines[-2:] == [
        f"normative blocks covered: 2/{len(raw)}",
        f"MUST statements covered: {_must(PASSED) + _must(SHARED)}/{must_total}",
    ]
    assert lines[0].split() == ["area", "covered", "driver", "device"]
    assert any(line.startswith("core: Split Virtqueues") for line in lines)
    command = " ".join(["pytest", *record["args"]])
    assert f"test record: {record['_path']} (written {record['time']} by `{command}`)" in lines
    assert "tests: 3 passed, 1 failed, 2 skipped, 1 errors, 0 not run, of 7" in lines
    assert any(
        line.startswith("tagged tests that passed with zero assertions: 1") for line in lines
    )
    assert f"empty: test_inner.py::test_asserts_nothing  [{EMPTY}, {SHARED}]" in lines


def _write(path: Path, tests: list[dict[str, Any]], counting: str = "check-wrapper") -> Path:
    path.write_text(
        json.dumps(
            {
                "format": RECORD_FORMAT,
                "time": "2026-01-02T03:04:05+00:00",
                "args": ["tests"],
                "assertion_counting": counting,
                "collection_errors": [],
                "tests": tests,
            }
        )
    )
    return path


def test_must_statements_of_the_covered_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    covering = [PASSED, FAILED, SKIPPED]  # all three covered by one passing test
    path = _write(
        tmp_path / "r.json",
        [
            {"nodeid": "t::a", "outcome": "passed", "normative": covering, "assertions": 3},
            {"nodeid": "t::b", "outcome": "failed", "normative": [EMPTY], "assertions": 9},
            {"nodeid": "t::c", "outcome": "passed", "normative": [ERROR], "assertions": 0},
        ],
    )
    assert main(["--record", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = sum(_must(i) for i in covering)
    assert expected == sum(blocks()[i].must_statements for i in covering)
    assert lines[-2:] == [
        "normative blocks covered: 3/309",
        f"MUST statements covered: {expected}/1383",
    ]


def test_normative_blocks_carry_their_must_counts() -> None:
    by_id = {raw["id"]: raw["keywords"] for raw in load("normative.json")["blocks"]}
    for block in blocks().values():
        assert block.must == by_id[block.id]["MUST"]
        assert block.must_not == by_id[block.id]["MUST_NOT"]
    assert sum(b.must for b in blocks().values()) == 1121
    assert sum(b.must_not for b in blocks().values()) == 262


def test_without_a_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.json"
    assert main(["--record", str(missing), "--tests", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith(f"no test record at {missing}") and "./dev test" in line for line in lines
    )
    assert lines[-2:] == ["normative blocks covered: 0/309", "MUST statements covered: 0/1383"]


def test_the_record_path_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path / "env.json",
        [{"nodeid": "t::a", "outcome": "passed", "normative": [PASSED], "assertions": 1}],
    )
    monkeypatch.setenv(RECORD_ENV, str(path))
    assert main([]) == 0
    out = capsys.readouterr().out
    assert f"test record: {path} " in out
    assert out.endswith(
        f"normative blocks covered: 1/309\nMUST statements covered: {_must(PASSED)}/1383\n"
    )


def test_unknown_ids_in_the_record_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path / "r.json",
        [
            {
                "nodeid": "t::a",
                "outcome": "passed",
                "normative": ["x:nonsense", PASSED],
                "assertions": 1,
            }
        ],
    )
    assert main(["--record", str(path), "--tests", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "unknown normative id in test record: x:nonsense" in lines
    assert lines[-2] == "normative blocks covered: 1/309"
    assert main(["--record", str(path), "--tests", str(tmp_path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["unknown"] == ["x:nonsense"]


def test_a_broken_record_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.json"
    path.write_text("{not json")
    assert main(["--record", str(path)]) == 2
    assert "cannot read test record" in capsys.readouterr().err
    path.write_text(json.dumps({"format": "something else", "tests": []}))
    assert main(["--record", str(path)]) == 2
    assert "format" in capsys.readouterr().err


def test_counting_off_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path / "r.json",
        [{"nodeid": "t::a", "outcome": "passed", "normative": [PASSED], "assertions": 0}],
        counting="off",
    )
    assert main(["--record", str(path)]) == 0
    out = capsys.readouterr().out
    assert "enable_assertion_pass_hook was off" in out
    assert "normative blocks covered: 0/309" in out


def test_the_default_record_path_and_collection_errors(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(RECORD_ENV, raising=False)
    pytester.makeini(INI)
    pytester.makepyfile(
        test_ok=f"import pytest\n@pytest.mark.normative({PASSED!r})\ndef test_a():\n    assert 1\n",
        test_broken="import nonexistent_module_xyz\n",
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)  # a collection error: pytest runs nothing
    data = json.loads((pytester.path / ".pyvirtio" / "test-record.json").read_text())
    assert data["collection_errors"] == ["test_broken.py"]
    assert [(t["nodeid"], t["outcome"], t["assertions"]) for t in data["tests"]] == [
        ("test_ok.py::test_a", "not run", 0)
    ]
    assert data["counts"]["not run"] == 1
    result = pytester.runpytest("--continue-on-collection-errors")
    result.assert_outcomes(passed=1, errors=1)
    data = json.loads((pytester.path / ".pyvirtio" / "test-record.json").read_text())
    assert [(t["nodeid"], t["outcome"], t["assertions"]) for t in data["tests"]] == [
        ("test_ok.py::test_a", "passed", 1)
    ]


def test_collect_only_keeps_the_last_record(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = pytester.path / "record.json"
    monkeypatch.setenv(RECORD_ENV, str(path))
    pytester.makeini(INI)
    pytester.makepyfile(test_ok="def test_a():\n    assert 1\n")
    pytester.runpytest("--collect-only").assert_outcomes()
    assert not path.exists()
    pytester.runpytest().assert_outcomes(passed=1)
    assert json.loads(path.read_text())["counts"]["passed"] == 1


def test_pycs_rewritten_without_the_hook_are_not_reused(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pytest keys its rewritten pycs by source only; the plugin keeps the two kinds apart."""
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    path = pytester.path / "record.json"
    monkeypatch.setenv(RECORD_ENV, str(path))
    pytester.makeini(INI)
    pytester.makepyfile(test_ok="def test_a():\n    assert 1\n    assert 2\n")
    for option, counting, asserts in (("false", "off", 0), ("true", "check-wrapper", 2)):
        result = pytester.runpytest_subprocess("-o", f"enable_assertion_pass_hook={option}")
        result.assert_outcomes(passed=1)
        data = json.loads(path.read_text())
        assert data["assertion_counting"] == counting
        assert data["tests"][0]["assertions"] == asserts
    pycs = sorted(p.name for p in (pytester.path / "__pycache__").glob("test_ok.*.pyc"))
    assert len(pycs) == 2
    assert sum(name.endswith("-passcount.pyc") for name in pycs) == 1
    assert os.environ.get("PYTHONDONTWRITEBYTECODE") is None
