"""engine.io.atomic: the one atomic write every file of a run, an export and the NLTK data goes through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.io.atomic import TMP_MARK, atomic_write_bytes
from engine.io.shards import clean_temporaries


def test_data_files_are_written_with_the_umask_mode(tmp_path) -> None:
    # mkstemp creates 0600 files: a lexicon or tagger file built by one user must stay readable by the others
    # that share the data directory (umask 022 -> 0644, umask 077 -> 0600), and the write replaces atomically.
    import os

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "shared.json", b"{}")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.json", b"[]")
        atomic_write_bytes(tmp_path / "shared.json", b"{\"a\": 1}")
    finally:
        os.umask(old)
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o600  # rewritten under umask 077
    assert (tmp_path / "shared.json").read_bytes() == b'{"a": 1}'
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "shared.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.json", "shared.json"]  # no temp files left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_bytes(target, b"old")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new and longer")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_folders_are_made_and_a_killed_writes_temporary_is_found_by_the_cleaner(tmp_path, monkeypatch) -> None:
    atomic_write_bytes(tmp_path / "shards" / "000000.tar", b"tar")
    assert (tmp_path / "shards" / "000000.tar").read_bytes() == b"tar"
    # stop the write at its rename and note the temporary it made: what a SIGKILL there leaves behind
    temporaries = []

    def killed(src, dst):
        temporaries.append(Path(src))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "shards" / "000001.tar", b"partial")
    monkeypatch.undo()
    assert not (tmp_path / "shards" / "000001.tar").exists()
    assert not temporaries[0].exists()  # an exception still deletes it
    temporaries[0].write_bytes(b"partial")  # a kill does not
    assert TMP_MARK in temporaries[0].name and temporaries[0].parent == tmp_path / "shards"
    assert clean_temporaries(tmp_path) == 1
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["000000.tar"]
