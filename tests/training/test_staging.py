"""Export's staging folders: a killed export's debris goes, a running export's folder stays,
and a bundle replaced by two renames is never lost (issue 25, "No debris")."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rmserve.training.export import staging as staging_module
from rmserve.training.export.staging import clean_stale, move_into_place, staged

# An export in a child process: it stages a file, prints its staging folder, waits for its
# standard input to close, then puts the bundle in place.
CHILD = """
import sys
from pathlib import Path
from rmserve.training.export.staging import move_into_place, staged

out = Path(sys.argv[1])
with staged(out) as staging:
    (staging / "model.onnx").write_text("child")
    print(staging, flush=True)
    sys.stdin.read()
    (staging / "rmserve.json").write_text("child")
    move_into_place(staging, out)
"""


@contextmanager
def child_export(out: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A running export to ``out`` in a child process and its staging folder."""
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line:
            _, err = process.communicate()
            pytest.fail(f"the child export did not start: {err}")
        yield process, Path(line)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def export(out: Path, text: str) -> None:
    """An export of a two-file bundle holding ``text``."""
    with staged(out) as staging:
        for name in ("model.onnx", "rmserve.json"):
            (staging / name).write_text(text)
        move_into_place(staging, out)


def bundle(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def beside(out: Path) -> set[str]:
    return {p.name for p in out.parent.iterdir()}


@pytest.fixture(params=["exchange", "two renames"])
def replace_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """move_into_place both ways: one swap (Linux) and the two renames used elsewhere."""
    if request.param == "two renames":
        monkeypatch.setattr(staging_module, "_exchange", lambda a, b: False)
    return str(request.param)


def test_move_into_place_creates_then_replaces_a_bundle(tmp_path: Path, replace_by: str) -> None:
    out = tmp_path / "bundle"
    export(out, "first")
    assert bundle(out) == {"model.onnx": "first", "rmserve.json": "first"}
    export(out, "second")
    assert bundle(out) == {"model.onnx": "second", "rmserve.json": "second"}
    assert beside(out) == {"bundle"}


def test_a_failed_export_leaves_nothing_and_keeps_the_bundle(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    export(out, "first")

    def failed_export() -> None:
        with staged(out) as staging:
            (staging / "model.onnx").write_text("half")
            raise RuntimeError("a check failed")

    with pytest.raises(RuntimeError, match="a check failed"):
        failed_export()
    assert bundle(out) == {"model.onnx": "first", "rmserve.json": "first"}
    assert beside(out) == {"bundle"}


def test_a_failed_second_rename_puts_the_old_bundle_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging_module, "_exchange", lambda a, b: False)
    out = tmp_path / "bundle"
    export(out, "first")
    with pytest.raises(FileNotFoundError):
        move_into_place(tmp_path / ".bundle.partial-gone1234", out)
    assert bundle(out) == {"model.onnx": "first", "rmserve.json": "first"}
    assert beside(out) == {"bundle"}


def test_a_killed_exports_folder_is_removed_by_the_next_export(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    export(out, "first")
    with child_export(out) as (process, partial):
        assert partial.parent == tmp_path
        assert partial.name.startswith(f".bundle.partial-{process.pid}-")
        process.kill()  # SIGKILL: the child cleans up nothing
        process.wait()
    assert (partial / "model.onnx").read_text() == "child"
    export(out, "second")
    assert bundle(out) == {"model.onnx": "second", "rmserve.json": "second"}
    assert beside(out) == {"bundle"}


def test_a_running_exports_folder_survives_a_second_export(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with child_export(out) as (process, partial):
        assert clean_stale(out) == []
        export(out, "second")
        assert bundle(out) == {"model.onnx": "second", "rmserve.json": "second"}
        assert bundle(partial) == {"model.onnx": "child"}
        _, err = process.communicate("")  # the child goes on to finish its export
        assert process.returncode == 0, err
    assert bundle(out) == {"model.onnx": "child", "rmserve.json": "child"}  # the last one wins
    assert beside(out) == {"bundle"}


def test_this_processs_own_staging_folder_survives_cleaning(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with staged(out) as staging:
        assert clean_stale(out) == []
        assert staging.is_dir()
        move_into_place(staging, out)


def test_a_crash_between_the_two_renames_puts_the_old_bundle_back(tmp_path: Path) -> None:
    """On disk after the first rename: no out, the old bundle in an old folder, the new one
    (complete, but its export is dead) in an unlocked staging folder."""
    out = tmp_path / "bundle"
    old = tmp_path / ".bundle.old-4242-abcd1234"
    (old / "bundle").mkdir(parents=True)
    (old / "bundle" / "model.onnx").write_text("old")
    partial = tmp_path / ".bundle.partial-4242-efgh5678"
    partial.mkdir()
    (partial / "model.onnx").write_text("new")
    assert sorted(clean_stale(out)) == [old, partial]
    assert bundle(out) == {"model.onnx": "old"}
    assert beside(out) == {"bundle"}


def test_the_newest_old_bundle_is_the_one_restored(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    for name, when in ((".bundle.old-older123", 1_000), (".bundle.old-newer123", 2_000)):
        (tmp_path / name / "bundle").mkdir(parents=True)
        (tmp_path / name / "bundle" / "model.onnx").write_text(name)
        os.utime(tmp_path / name, (when, when))
    assert len(clean_stale(out)) == 2
    assert bundle(out) == {"model.onnx": ".bundle.old-newer123"}
    assert beside(out) == {"bundle"}


def test_old_folders_beside_a_present_bundle_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    export(out, "current")
    (tmp_path / ".bundle.old-abcd1234" / "bundle").mkdir(parents=True)  # an older version's
    (tmp_path / ".bundle.old-abcd1234" / "bundle" / "model.onnx").write_text("old")
    (tmp_path / ".bundle.old-empty123").mkdir()  # killed before its first rename
    assert len(clean_stale(out)) == 2
    assert bundle(out) == {"model.onnx": "current", "rmserve.json": "current"}
    assert beside(out) == {"bundle"}


def test_an_old_folder_of_a_live_move_is_not_restored(tmp_path: Path) -> None:
    """A live export between its two renames holds its old folder's lock: out is missing
    only for a moment, and putting the old bundle back would make its second rename fail."""
    out = tmp_path / "bundle"
    old, lock = staging_module._create_locked(out, "old")
    try:
        (old / "bundle").mkdir()
        assert clean_stale(out) == []
        assert not out.exists()
        assert (old / "bundle").is_dir()
    finally:
        staging_module._unlock(lock)


def test_other_folders_beside_out_are_untouched(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    target = tmp_path / "elsewhere"
    target.mkdir()
    keep = [
        ".other.partial-abcd1234",  # another bundle's
        ".bundle2.partial-abcd1234",
        "bundle.partial-abcd1234",  # not hidden
        ".bundle.partial-backup",  # not a staging folder's suffix
        ".bundle.partial-abcd1234.keep",
        ".bundle.old-ABCD1234",
        ".bundle.tmp-abcd1234",
    ]
    for name in keep:
        (tmp_path / name).mkdir()
        (tmp_path / name / "bundle").mkdir()
    (tmp_path / ".bundle.old-file1234").write_text("a file, not a folder")
    (tmp_path / ".bundle.partial-link1234").symlink_to(target)
    export(out, "first")
    export(out, "second")
    expected = {*keep, "bundle", "elsewhere", ".bundle.old-file1234", ".bundle.partial-link1234"}
    assert beside(out) == expected
    assert target.is_dir()
    assert all((tmp_path / name / "bundle").is_dir() for name in keep)


def test_without_locks_a_staging_folder_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without locks: export works as before, and nothing it cannot prove dead
    is removed."""
    out = tmp_path / "bundle"
    stale = tmp_path / ".bundle.partial-abcd1234"
    stale.mkdir()

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    export(out, "first")
    assert bundle(out) == {"model.onnx": "first", "rmserve.json": "first"}
    assert beside(out) == {"bundle", stale.name}
