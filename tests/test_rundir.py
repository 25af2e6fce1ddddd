"""Run directories (issue "Runs that survive"): lock, writability, stale temporary files, logs
trimmed to the resumed checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from robustkit.errors import OutputError, UserError
from robustkit.training.rundir import RunDirectory
from robustkit.utils import check_writable, clean_tmp


def test_check_writable_refuses_a_file_and_a_read_only_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="existing file"):
        check_writable(f)
    ro = tmp_path / "ro"
    ro.mkdir()

    def denied(self, data):  # a read-only mount (root ignores permission bits, so simulate it)
        raise PermissionError(13, "Permission denied", str(self))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(ro), "write_bytes", denied)
        with pytest.raises(OutputError, match="not writable .*Permission denied"):
            check_writable(ro)
    assert issubclass(OutputError, UserError)
    assert check_writable(tmp_path / "new" / "deep").is_dir()


def test_a_second_live_run_is_refused_and_the_lock_dies_with_its_process(tmp_path):
    run = RunDirectory(tmp_path)
    run.acquire()
    code = textwrap.dedent(f"""
        from robustkit.training.rundir import RunDirectory
        from robustkit.errors import OutputError
        try:
            RunDirectory({str(tmp_path)!r}).acquire()
        except OutputError as err:
            print("REFUSED", err)
        else:
            print("ACQUIRED")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "REFUSED" in out and f"pid {os.getpid()}" in out
    run.release()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "ACQUIRED" in out  # the child exited: its lock went with it


def test_clean_tmp_removes_only_interrupted_atomic_writes(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"x" * 10)
    (tmp_path / ".config.yaml.q.tmp").write_bytes(b"")
    keep = [tmp_path / "last.pt", tmp_path / "notes.tmp", tmp_path / ".lock"]
    for k in keep:
        k.write_bytes(b"k")
    removed = clean_tmp(tmp_path)
    assert sorted(p.name for p in removed) == [".config.yaml.q.tmp", ".last.pt.abc123.tmp"]
    assert all(k.exists() for k in keep)


def test_trim_jsonl_keeps_exactly_the_lines_up_to_the_checkpoint(tmp_path):
    lines = [{"type": "step", "epoch": 0, "step": s} for s in (10, 20, 30)]
    lines += [{"type": "epoch", "epoch": 1, "step": 30}]
    lines += [{"type": "step", "epoch": 1, "step": s} for s in (40, 50)]
    lines += [{"type": "epoch", "epoch": 2, "step": 60}]
    lines += [{"type": "step", "epoch": 2, "step": 70}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"type\": \"st")  # torn line
    dropped = RunDirectory(tmp_path).trim_jsonl("metrics.jsonl", step=30, epoch=1)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == lines[:4] and dropped == 5


def test_start_fresh_keeps_the_old_log_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"type": "epoch", "epoch": 1}\n')
    RunDirectory(tmp_path).start_fresh()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "metrics.jsonl.old").read_text().startswith('{"type"')


def test_start_fresh_moves_folders_too_and_never_overwrites_an_older_copy(tmp_path):
    run = RunDirectory(tmp_path)
    for generation in ("first", "second"):
        (tmp_path / "tb").mkdir()
        (tmp_path / "tb" / "events").write_text(generation)
        (tmp_path / "metrics.jsonl").write_text(generation)
        run.start_fresh(("metrics.jsonl", "tb", "best.pt"))  # best.pt absent: skipped
    assert (tmp_path / "metrics.jsonl.old").read_text() == "first"
    assert (tmp_path / "metrics.jsonl.old.1").read_text() == "second"
    assert (tmp_path / "tb.old" / "events").read_text() == "first"
    assert (tmp_path / "tb.old.1" / "events").read_text() == "second"
    assert not (tmp_path / "tb").exists() and not (tmp_path / "best.pt.old").exists()
