"""`virtio spec-coverage`: which normative blocks the test suite checks, by the last test run.

Tests name the blocks they check with ``@pytest.mark.normative("id", ...)`` (or a
module-level ``pytestmark``). Every run of the project's tests writes a test record
(``virtio.spec.pytest_plugin``: ``$PYVIRTIO_TEST_RECORD``, else
``<project>/.pyvirtio/test-record.json``) giving each test's outcome, normative ids and
number of passing assertions. A block counts as covered only if at least one test citing it
passed and had at least one passing assertion.

The test sources are still scanned statically, for one thing: ids they cite that are not in
normative.json are reported and make the exit status 1.

Standard library only: this runs without the test dependencies.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtio.spec.normative import NormativeBlock, blocks

RECORD_ENV = "PYVIRTIO_TEST_RECORD"
RECORD_FORMAT = "pyvirtio-test-record/1"


def _strings(node: ast.AST, constants: dict[str, list[str]]) -> list[str]:
    """String values of a marker argument: literals, starred lists, module constants."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Starred):
        return _strings(node.value, constants)
    if isinstance(node, ast.List | ast.Tuple):
        return [s for elt in node.elts for s in _strings(elt, constants)]
    if isinstance(node, ast.Name):
        return constants.get(node.id, [])
    return []


def _is_normative_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return isinstance(func, ast.Attribute) and func.attr == "normative"


def ids_in_source(source: str) -> set[str]:
    tree = ast.parse(source)
    constants: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                values = _strings(node.value, constants)
                if values:
                    constants[target.id] = values
    found: set[str] = set()
    for call in ast.walk(tree):
        if _is_normative_call(call):
            assert isinstance(call, ast.Call)
            for arg in call.args:
                found.update(_strings(arg, constants))
    return found


def scan(tests: Path) -> dict[str, set[str]]:
    """Normative id -> the test files that cite it (static scan of the sources)."""
    out: dict[str, set[str]] = defaultdict(set)
    for path in sorted(tests.rglob("*.py")):
        try:
            ids = ids_in_source(path.read_text())
        except SyntaxError:
            continue
        for block_id in ids:
            out[block_id].add(str(path.relative_to(tests)))
    return dict(out)


def _project_root() -> Path:
    here = Path.cwd()
    if (here / "tests").is_dir():
        return here
    return Path(__file__).resolve().parents[3]


def _default_tests_dir() -> Path:
    return _project_root() / "tests"


def default_record_path(rootdir: Path | None = None) -> Path:
    """$PYVIRTIO_TEST_RECORD, else <rootdir>/.pyvirtio/test-record.json."""
    env = os.environ.get(RECORD_ENV)
    if env:
        return Path(env)
    return (rootdir or _project_root()) / ".pyvirtio" / "test-record.json"


# --- the test record ------------------------------------------------------------------------


class RecordError(ValueError):
    """The test record is not one this version can read."""


@dataclass(frozen=True)
class RecordedTest:
    nodeid: str
    outcome: str  # passed, failed, skipped, error, not run
    normative: tuple[str, ...]
    assertions: int  # passing assertions during the call

    @property
    def counts(self) -> bool:
        """Does this test cover the blocks it cites?"""
        return self.outcome == "passed" and self.assertions > 0

    @property
    def empty(self) -> bool:
        """A tagged test that passed without a single passing assertion."""
        return self.outcome == "passed" and self.assertions == 0 and bool(self.normative)


@dataclass(frozen=True)
class TestRecord:
    path: Path
    time: str
    args: tuple[str, ...]
    assertion_counting: str
    collection_errors: tuple[str, ...]
    tests: tuple[RecordedTest, ...]

    __test__ = False  # not a pytest test class

    def count(self, outcome: str) -> int:
        return sum(1 for t in self.tests if t.outcome == outcome)


def _field(obj: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = obj.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(f"field {key!r} is not a {kind.__name__}")
    return value


def _strs(values: Any, what: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RecordError(f"{what} is not a list of strings")
    return tuple(values)


def parse_record(data: Any, path: Path) -> TestRecord:
    if not isinstance(data, dict):
        raise RecordError("not a JSON object")
    fmt = data.get("format")
    if fmt != RECORD_FORMAT:
        raise RecordError(f"format is {fmt!r}, expected {RECORD_FORMAT!r}")
    raw_tests = _field(data, "tests", list)
    tests: list[RecordedTest] = []
    for raw in raw_tests:
        if not isinstance(raw, dict):
            raise RecordError("a test entry is not an object")
        tests.append(
            RecordedTest(
                nodeid=_field(raw, "nodeid", str),
                outcome=_field(raw, "outcome", str),
                normative=_strs(raw.get("normative", []), "normative"),
                assertions=_field(raw, "assertions", int, 0),
            )
        )
    return TestRecord(
        path=path,
        time=_field(data, "time", str, "?"),
        args=_strs(data.get("args", []), "args"),
        assertion_counting=_field(data, "assertion_counting", str, "?"),
        collection_errors=_strs(data.get("collection_errors", []), "collection_errors"),
        tests=tuple(tests),
    )


def load_record(path: Path) -> TestRecord | None:
    """The record at path, None if there is none; RecordError if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RecordError(str(e)) from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"not JSON: {e}") from e
    return parse_record(data, path)


# --- the report -----------------------------------------------------------------------------


def covered_ids(record: TestRecord | None) -> set[str]:
    """Ids cited by at least one test that passed with at least one passing assertion."""
    if record is None:
        return set()
    return {block_id for t in record.tests if t.counts for block_id in t.normative}


def _area_rows(all_blocks: dict[str, NormativeBlock], covered: set[str]) -> list[dict[str, Any]]:
    areas: dict[tuple[str, str], dict[str, int]] = {}
    for block in all_blocks.values():
        row = areas.setdefault(
            (block.area_group, block.area),
            dict.fromkeys(
                ("driver", "device", "driver_covered", "device_covered", "must", "must_covered"),
                0,
            ),
        )
        row[block.kind] += 1
        row["must"] += block.must_statements
        if block.id in covered:
            row[f"{block.kind}_covered"] += 1
            row["must_covered"] += block.must_statements
    return [{"group": g, "area": a, **counts} for (g, a), counts in areas.items()]


def report(tests: Path, record: TestRecord | None = None) -> dict[str, Any]:
    """The coverage by record (None: no record, nothing covered); tests is scanned for ids."""
    all_blocks = blocks()
    cited_in_sources = scan(tests)
    recorded_ids = set() if record is None else {i for t in record.tests for i in t.normative}
    covered = covered_ids(record) & set(all_blocks)
    empty = [] if record is None else [t for t in record.tests if t.empty]
    record_info: dict[str, Any] | None = None
    if record is not None:
        record_info = {
            "path": str(record.path),
            "time": record.time,
            "args": list(record.args),
            "assertion_counting": record.assertion_counting,
            "tests": len(record.tests),
            "passed": record.count("passed"),
            "failed": record.count("failed"),
            "skipped": record.count("skipped"),
            "error": record.count("error"),
            "not_run": record.count("not run"),
            "collection_errors": list(record.collection_errors),
        }
    unknown_in_tests = sorted(set(cited_in_sources) - set(all_blocks))
    unknown_in_record = sorted(recorded_ids - set(all_blocks))
    return {
        "areas": _area_rows(all_blocks, covered),
        "covered": len(covered),
        "total": len(all_blocks),
        "must_covered": sum(all_blocks[i].must_statements for i in covered),
        "must_total": sum(b.must_statements for b in all_blocks.values()),
        "missing": sorted(set(all_blocks) - covered),
        "unknown": sorted(set(unknown_in_tests) | set(unknown_in_record)),
        "unknown_in_tests": unknown_in_tests,
        "unknown_in_record": unknown_in_record,
        "empty_tests": [{"nodeid": t.nodeid, "normative": list(t.normative)} for t in empty],
        "record": record_info,
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    width = max(len(f"{r['group']}: {r['area']}") for r in rows)
    print(f"{'area':<{width}}  {'covered':>8}  {'driver':>7}  {'device':>7}")
    for r in rows:
        name = f"{r['group']}: {r['area']}"
        cov = r["driver_covered"] + r["device_covered"]
        tot = r["driver"] + r["device"]
        drv = f"{r['driver_covered']}/{r['driver']}"
        dev = f"{r['device_covered']}/{r['device']}"
        print(f"{name:<{width}}  {f'{cov}/{tot}':>8}  {drv:>7}  {dev:>7}")


def _print_record(info: dict[str, Any] | None, path: Path, empty: int) -> None:
    print()
    if info is None:
        print(
            f"no test record at {path}: nothing counts as covered until the tests run;"
            " make one with `./dev test` (or `.venv/bin/pytest`)"
        )
        return
    command = " ".join(["pytest", *info["args"]])
    print(f"test record: {info['path']} (written {info['time']} by `{command}`)")
    print(
        f"tests: {info['passed']} passed, {info['failed']} failed, {info['skipped']} skipped,"
        f" {info['error']} errors, {info['not_run']} not run, of {info['tests']}"
    )
    if info["collection_errors"]:
        print(
            f"collection errors: {len(info['collection_errors'])}: "
            + ", ".join(info["collection_errors"])
        )
    if info["assertion_counting"] == "off":
        print(
            "the record counted no assertions (enable_assertion_pass_hook was off):"
            " no test can cover a block"
        )
        return
    print(
        f"tagged tests that passed with zero assertions: {empty}"
        + (" (they count for nothing; --list-empty lists them)" if empty else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="virtio spec-coverage",
        description="Normative blocks covered by tests that passed with assertions, per area.",
    )
    parser.add_argument(
        "--record",
        type=Path,
        default=None,
        help=f"test record (default: ${RECORD_ENV}, else .pyvirtio/test-record.json)",
    )
    parser.add_argument(
        "--tests", type=Path, default=None, help="tests directory, scanned for unknown ids"
    )
    parser.add_argument("--list-missing", action="store_true", help="list uncovered ids")
    parser.add_argument(
        "--list-empty",
        action="store_true",
        help="list tagged tests that passed with zero assertions",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    tests = args.tests or _default_tests_dir()
    if not tests.is_dir():
        print(f"virtio spec-coverage: no tests directory at {tests}", file=sys.stderr)
        return 2
    record_path = args.record or default_record_path()
    try:
        record = load_record(record_path)
    except RecordError as e:
        print(f"virtio spec-coverage: cannot read test record {record_path}: {e}", file=sys.stderr)
        return 2
    data = report(tests, record)
    status = 1 if data["unknown"] else 0
    if args.json:
        print(json.dumps(data, indent=2))
        return status
    _print_table(data["areas"])
    _print_record(data["record"], record_path, len(data["empty_tests"]))
    for block_id in data["unknown_in_tests"]:
        print(f"unknown normative id in tests: {block_id}")
    for block_id in data["unknown_in_record"]:
        print(f"unknown normative id in test record: {block_id}")
    if args.list_missing:
        print()
        for block_id in data["missing"]:
            print(f"missing: {block_id}")
    if args.list_empty:
        print()
        for t in data["empty_tests"]:
            print(f"empty: {t['nodeid']}  [{', '.join(t['normative'])}]")
    print(f"normative blocks covered: {data['covered']}/{data['total']}")
    print(f"MUST statements covered: {data['must_covered']}/{data['must_total']}")
    return status
