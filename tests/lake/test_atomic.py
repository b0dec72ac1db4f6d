from pathlib import Path

import pytest

from msif_assets.lake import atomic
from msif_assets.lake.atomic import atomic_write, atomic_write_bytes, atomic_write_text, replace_directory


class Crash(RuntimeError):
    pass


def test_atomic_write_bytes_replaces_content(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_crash_mid_write_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text("new but incomplete")
        raise Crash("power cut")

    with pytest.raises(Crash):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_writer_that_creates_nothing_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="did not create"):
        atomic_write(tmp_path / "x", lambda tmp: None)
    assert not (tmp_path / "x").exists()


def _fill(files: dict[str, str]):
    def fill(d: Path) -> None:
        for name, text in files.items():
            (d / name).write_text(text)
    return fill


@pytest.fixture(params=["exchange", "rename-aside"])
def swap_mode(request, monkeypatch):
    """Run directory tests with renameat2(RENAME_EXCHANGE) and with the portable fallback."""
    if request.param == "rename-aside":
        monkeypatch.setattr(atomic, "_EXCHANGE", None)
    elif atomic._EXCHANGE is None:
        pytest.skip("renameat2 is not available on this platform")
    return request.param


def test_replace_directory_swaps_whole_partition(tmp_path, swap_mode):
    target = tmp_path / "table" / "shard=a"
    staging = tmp_path / ".staging"
    replace_directory(target, _fill({"part-0.parquet": "old0", "part-1.parquet": "old1"}), staging)
    replace_directory(target, _fill({"part-0.parquet": "new0"}), staging)
    # rerun replaces: the old extra file is gone, nothing was appended
    assert {p.name: p.read_text() for p in target.iterdir()} == {"part-0.parquet": "new0"}
    assert list(staging.iterdir()) == []


def test_replace_directory_crash_leaves_old_partition_intact(tmp_path, swap_mode):
    target = tmp_path / "shard=a"
    staging = tmp_path / ".staging"
    replace_directory(target, _fill({"part.parquet": "old"}), staging)

    def crash(d: Path) -> None:
        (d / "part.parquet").write_text("half")
        raise Crash("killed")

    with pytest.raises(Crash):
        replace_directory(target, crash, staging)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"part.parquet": "old"}
    assert list(staging.iterdir()) == []


def test_replace_directory_creates_missing_target(tmp_path):
    target = tmp_path / "deep" / "shard=b"
    replace_directory(target, _fill({"part.parquet": "x"}), tmp_path / ".staging")
    assert (target / "part.parquet").read_text() == "x"
