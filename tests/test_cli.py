"""The `virtio` command's jobs, run in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from virtio.cli import main
from virtio.spec.coverage import RECORD_FORMAT, ids_in_source, load_record, report


def _record(path: Path, tests: list[dict[str, object]]) -> Path:
    """A test record as virtio.spec.pytest_plugin writes it."""
    path.write_text(
        json.dumps(
            {
                "format": RECORD_FORMAT,
                "time": "2026-01-02T03:04:05+00:00",
                "args": [],
                "assertion_counting": "check-wrapper",
                "tests": tests,
            }
        )
    )
    return path


def test_spec_coverage_ends_with_the_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tests_dir = Path(__file__).parent
    reset = "devicenormative:Basic Facilities of a Virtio Device / Device Reset"
    path = _record(
        tmp_path / "record.json",
        [
            {"nodeid": "t.py::a", "outcome": "passed", "normative": [reset], "assertions": 2},
            {
                "nodeid": "t.py::b",
                "outcome": "failed",
                "normative": ["drivernormative:Reserved Feature Bits"],
                "assertions": 1,
            },
        ],
    )
    assert main(["spec-coverage", "--tests", str(tests_dir), "--record", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    data = report(tests_dir, load_record(path))
    assert data["covered"] == 1
    assert lines[-2] == "normative blocks covered: 1/309"
    assert lines[-1] == f"MUST statements covered: {data['must_covered']}/1383"
    assert data["must_covered"] == 3  # that block's 2 MUST + 1 MUST NOT
    assert any(line.startswith("core: Split Virtqueues") for line in lines)
    assert any(line.startswith(f"test record: {path} ") for line in lines)


def test_spec_coverage_scanner_reads_markers(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "IDS = ['devicenormative:Basic Facilities of a Virtio Device / Device Reset']\n"
        "pytestmark = pytest.mark.normative('drivernormative:Reserved Feature Bits')\n"
        "@pytest.mark.normative(*IDS, 'devicenormative:Reserved Feature Bits')\n"
        "def test_a() -> None: ...\n"
    )
    (tmp_path / "test_y.py").write_text(
        "import pytest\n@pytest.mark.normative('devicenormative:nonsense')\ndef test_b(): ...\n"
    )
    ids = {
        "devicenormative:Basic Facilities of a Virtio Device / Device Reset",
        "drivernormative:Reserved Feature Bits",
        "devicenormative:Reserved Feature Bits",
    }
    assert ids_in_source((tmp_path / "test_x.py").read_text()) == ids
    # Citing a block in the sources covers nothing: only a record of passing tests does.
    data = report(tmp_path)
    assert data["covered"] == 0
    assert data["unknown"] == ["devicenormative:nonsense"]
    test_a = {"nodeid": "test_x.py::test_a", "normative": sorted(ids)}
    passed = _record(tmp_path / "r.json", [{**test_a, "outcome": "passed", "assertions": 1}])
    assert report(tmp_path, load_record(passed))["covered"] == 3
    asserted_nothing = _record(
        tmp_path / "r0.json", [{**test_a, "outcome": "passed", "assertions": 0}]
    )
    assert report(tmp_path, load_record(asserted_nothing))["covered"] == 0
    argv = ["spec-coverage", "--tests", str(tmp_path), "--record", str(passed)]
    assert main(argv) == 1  # unknown ids in the sources fail


def test_bench_ring_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "ring", "--seconds", "0.05", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in (
        "split_1desc_chains_per_s",
        "split_3desc_chains_per_s",
        "packed_1desc_chains_per_s",
        "packed_3desc_chains_per_s",
        "loopback_blk_4k_requests_per_s",
        "loopback_blk_64k_requests_per_s",
    ):
        assert isinstance(data[key], int) and data[key] > 0


@pytest.mark.parametrize("rw", ["randread", "randwrite", "randrw"])
def test_bench_blk_loopback_with_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rw: str
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    argv = ["bench", "blk", "--loopback", str(image), "--rw", rw, "--iodepth", "4"]
    assert main([*argv, "--runtime", "0.2", "--verify", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["errors"] == 0 and data["verify_failures"] == 0
    assert data["iops"] > 0 and data["bw_bytes_per_s"] > 0
    assert set(data["lat_us"]) >= {"mean", "p50", "p99"}
    assert data["lat_us"]["p50"] <= data["lat_us"]["p99"]


def test_bad_arguments_get_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "blk", "--loopback", str(tmp_path / "missing.img")])
    assert exc.value.code == 2
    assert "no such image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "blk", "--loopback", "x", "--bs", "banana"])
    assert main(["bench", "nothing"]) == 2
