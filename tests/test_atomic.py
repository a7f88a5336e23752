"""write_atomic: the new content or the old, and never a temporary file left behind."""

from __future__ import annotations

import pytest

from labscale.atomic import write_atomic


def test_text_and_bytes_replace_the_file(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, "old")
    write_atomic(path, b"\x00new")
    assert path.read_bytes() == b"\x00new" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, 42)  # neither str nor bytes: the write fails after the temporary file exists
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_new_file_gets_the_users_umask(tmp_path, umask):
    import os
    import stat

    from labscale.atomic import current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        path = tmp_path / "report.md"
        write_atomic(path, "text")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    finally:
        os.umask(old)


def test_an_existing_file_keeps_its_mode(tmp_path):
    import os
    import stat

    path = tmp_path / "report.md"
    path.write_text("old")
    os.chmod(path, 0o640)
    write_atomic(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640
