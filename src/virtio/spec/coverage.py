"""`virtio spec-coverage`: which normative blocks the test suite checks.

Tests name the blocks they check with ``@pytest.mark.normative("id", ...)``
(or a module-level ``pytestmark``). This scans the test sources statically
(no test runs), so it is quick and works without the test dependencies.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

from virtio.spec.normative import blocks


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
    """Normative id -> the test files that cite it."""
    out: dict[str, set[str]] = defaultdict(set)
    for path in sorted(tests.rglob("*.py")):
        try:
            ids = ids_in_source(path.read_text())
        except SyntaxError:
            continue
        for block_id in ids:
            out[block_id].add(str(path.relative_to(tests)))
    return dict(out)


def _default_tests_dir() -> Path:
    here = Path.cwd() / "tests"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[3] / "tests"


def report(tests: Path) -> dict[str, object]:
    cited = scan(tests)
    all_blocks = blocks()
    areas: dict[tuple[str, str], dict[str, int]] = defaultdict(
        lambda: {"driver": 0, "device": 0, "driver_covered": 0, "device_covered": 0}
    )
    for block in all_blocks.values():
        row = areas[(block.area_group, block.area)]
        row[block.kind] += 1
        if block.id in cited:
            row[f"{block.kind}_covered"] += 1
    covered = sum(1 for b in all_blocks if b in cited)
    return {
        "areas": [{"group": g, "area": a, **counts} for (g, a), counts in areas.items()],
        "covered": covered,
        "total": len(all_blocks),
        "unknown": sorted(set(cited) - set(all_blocks)),
        "missing": sorted(set(all_blocks) - set(cited)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="virtio spec-coverage", description="Normative blocks covered by tests, per area."
    )
    parser.add_argument("--tests", type=Path, default=None, help="tests directory")
    parser.add_argument("--list-missing", action="store_true", help="list uncovered ids")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    tests = args.tests or _default_tests_dir()
    if not tests.is_dir():
        print(f"virtio spec-coverage: no tests directory at {tests}", file=sys.stderr)
        return 2
    data = report(tests)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = data["areas"]
    assert isinstance(rows, list)
    width = max(len(f"{r['group']}: {r['area']}") for r in rows)
    print(f"{'area':<{width}}  {'covered':>8}  {'driver':>7}  {'device':>7}")
    for r in rows:
        name = f"{r['group']}: {r['area']}"
        cov = r["driver_covered"] + r["device_covered"]
        tot = r["driver"] + r["device"]
        drv = f"{r['driver_covered']}/{r['driver']}"
        dev = f"{r['device_covered']}/{r['device']}"
        print(f"{name:<{width}}  {f'{cov}/{tot}':>8}  {drv:>7}  {dev:>7}")
    unknown = data["unknown"]
    assert isinstance(unknown, list)
    for block_id in unknown:
        print(f"unknown normative id in tests: {block_id}")
    if args.list_missing:
        missing = data["missing"]
        assert isinstance(missing, list)
        print()
        for block_id in missing:
            print(f"missing: {block_id}")
    print(f"normative blocks covered: {data['covered']}/{data['total']}")
    return 1 if unknown else 0
