"""The `virtio` command's jobs, run in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from virtio.cli import main
from virtio.spec.coverage import ids_in_source, report


def test_spec_coverage_ends_with_the_total(capsys: pytest.CaptureFixture[str]) -> None:
    tests_dir = Path(__file__).parent
    assert main(["spec-coverage", "--tests", str(tests_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    data = report(tests_dir)
    assert lines[-1] == f"normative blocks covered: {data['covered']}/309"
    assert any(line.startswith("core: Split Virtqueues") for line in lines)


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
    assert ids_in_source((tmp_path / "test_x.py").read_text()) == {
        "devicenormative:Basic Facilities of a Virtio Device / Device Reset",
        "drivernormative:Reserved Feature Bits",
        "devicenormative:Reserved Feature Bits",
    }
    data = report(tmp_path)
    assert data["covered"] == 3
    assert data["unknown"] == ["devicenormative:nonsense"]
    assert main(["spec-coverage", "--tests", str(tmp_path)]) == 1  # unknown ids fail


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
