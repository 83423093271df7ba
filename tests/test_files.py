"""crener.files: writes that cannot half-happen, and the one rule for reading a user's text file."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from crener.errors import DataError
from crener.files import read_text, write_atomic


def _full_disk_after(n: int):
    """A writer that gets ``n`` bytes out, then meets a full disk (as a write() does: no file name)."""

    def write(fh) -> None:
        fh.write(b"x" * n)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def test_a_write_is_whole_and_leaves_nothing_beside(tmp_path: Path) -> None:
    path = write_atomic(tmp_path / "sub" / "page.md", "表格\n")
    assert path.read_text(encoding="utf-8") == "表格\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["page.md"]


@pytest.mark.parametrize("failure", ["full disk", "interrupt"])
def test_a_failed_write_keeps_the_old_file_and_no_partial_one(failure: str, tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"previous")

    def interrupted(fh) -> None:
        fh.write(b"half")
        raise KeyboardInterrupt

    writer = _full_disk_after(1000) if failure == "full disk" else interrupted
    with pytest.raises(OSError if failure == "full disk" else KeyboardInterrupt) as info:
        write_atomic(path, writer)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    if failure == "full disk":  # the one-line report names the file the user asked for
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)


def test_a_checkpoint_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from crener import checkpoint
    from crener.cli import explain

    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_checkpoint(path, {"version": 1, "model": {}})
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", lambda state, fh: _full_disk_after(4096)(fh))
    with pytest.raises(OSError) as info:
        checkpoint.save_checkpoint(path, {"version": 1, "model": {"w": torch.zeros(10)}})
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    status, message = explain(info.value)
    assert status == 1 and str(path) in message and "no space left" in message


def test_a_device_is_written_in_place() -> None:
    write_atomic("/dev/null", "nothing\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # still the device, not a renamed file


def test_reading_a_users_text(tmp_path: Path) -> None:
    (tmp_path / "bom.txt").write_bytes("\ufeff张三\n".encode())
    assert read_text(tmp_path / "bom.txt") == "张三\n"
    # GBK 一 (d2 bb) happens to be valid UTF-8 too; 张 (d5 c5) is not.
    (tmp_path / "gbk.txt").write_bytes("一\n张三\n".encode("gbk"))
    with pytest.raises(DataError, match=r"gbk.txt:2: not UTF-8 text \(byte 0xd5 at offset 3\)"):
        read_text(tmp_path / "gbk.txt")
    with pytest.raises(DataError, match="is a folder"):
        read_text(tmp_path)
    with pytest.raises(DataError, match="no such"):
        read_text(tmp_path / "nosuch.txt")


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_an_interrupt_mid_write_waits_for_the_whole_file(tmp_path: Path, signame: str, request) -> None:
    """Ctrl-C or SIGTERM inside torch.save's archive surfaced as torch's own RuntimeError; held, it
    comes after the file is whole, as the interrupt it was (SIGTERM: the command line's Terminated)."""
    import signal

    import torch

    from crener import checkpoint
    from crener.cli import Terminated, _terminate_as_interrupt

    sig = getattr(signal, signame)
    # Python's own Ctrl-C handler, whatever an earlier test of this process left in place.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous_int))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    state = {"w": torch.arange(100_000, dtype=torch.float32)}
    path = tmp_path / "last.pt"

    def save(fh) -> None:
        os.kill(os.getpid(), sig)  # arrives while the archive is being written
        torch.save(state, fh)

    with _terminate_as_interrupt(), pytest.raises(Terminated if signame == "SIGTERM" else KeyboardInterrupt):
        write_atomic(path, save)
    assert torch.equal(checkpoint.read_state(path)["w"], state["w"])  # whole, and the new one
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_ignored_signal_stays_ignored_across_a_write(tmp_path: Path) -> None:
    import signal

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        write_atomic(tmp_path / "x.txt", lambda fh: (os.kill(os.getpid(), signal.SIGTERM), fh.write(b"ok")))
        assert (tmp_path / "x.txt").read_bytes() == b"ok"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
