"""``robustkit demo``'s flags and what it prints, without running its steps: every bad flag is one
line and exit code 2 before any work (``--cifar-n -1`` once ran the whole demo), and the paths it
prints are relative to the current folder when they lie under it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from robustkit.cli import demo, main


@pytest.fixture
def steps(monkeypatch, tmp_path):
    """The demo with its subcommands replaced by stubs that write what the demo reads back;
    returns the list of subcommands called (nothing runs when a flag is refused)."""
    calls: list[list[str]] = []

    def fake_call(argv: list[str]) -> None:
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        if argv[0] == "evaluate":
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(
                {"dataset": argv[argv.index("--dataset") + 1], "accuracy": {"clean": 1.0}}))
        elif argv[0] == "sensitivity":
            out.mkdir(parents=True, exist_ok=True)
            (out / "sensitivity.json").write_text("{}")
        elif argv[0] == "inspect":
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text("{}")

    def fake_page(path, **kwargs) -> Path:
        Path(path).write_text("<html></html>")
        return Path(path)

    import robustkit.reports.demo as page

    monkeypatch.setattr(demo, "_call", fake_call)
    monkeypatch.setattr(page, "write_demo_page", fake_page)
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.mark.parametrize("argv, named", [
    (["--cifar-n", "-1"], r"--cifar-n -1: must lie in \[0, 1000\]"),
    (["--cifar-n", "1001"], r"--cifar-n 1001: must lie in \[0, 1000\]"),
    (["--cifar-n", "ten"], r"--cifar-n 'ten': expected an integer"),
    (["--mnist-n", "0"], r"--mnist-n 0: must lie in \[1, 1000\]"),
    (["--mnist-n", "5000"], r"--mnist-n 5000: must lie in \[1, 1000\]"),
    (["--sensitivity-n", "1"], r"--sensitivity-n 1: must lie in \[2, 1000\]"),
    (["--inspect-n", "-3"], r"--inspect-n -3: must lie in \[2, 1000\]"),
    (["--inspect-n", "2.5"], r"--inspect-n '2.5': expected an integer"),
    (["--epochs", "0"], r"--epochs 0: must lie in \[1, 1000\]"),
    (["--epochs", "-2"], r"--epochs -2: must lie in"),
    (["--device", "gpu7"], r"--device 'gpu7'"),
])
def test_every_out_of_range_flag_is_one_line_before_any_step(steps, capsys, argv, named):
    rc = main(["demo", "--out", "out", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("robustkit demo: error: ")
    assert re.search(named, err[0]), err[0]
    assert steps == []  # refused before the first step


def test_an_output_path_that_is_a_file_is_refused_first(steps, capsys, tmp_path):
    (tmp_path / "taken").write_text("")
    assert main(["demo", "--out", "taken"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out taken is an existing file" in err[0], err
    assert steps == []


def test_the_bounds_accept_their_edges(steps, capsys):
    rc = main(["demo", "--out", "out", "--cifar-n", "0", "--mnist-n", "1000",
               "--sensitivity-n", "2", "--inspect-n", "2", "--epochs", "1"])
    assert rc == 0, capsys.readouterr().err
    assert [c[0] for c in steps] == ["evaluate", "evaluate", "train", "evaluate", "sensitivity",
                                     "inspect"]  # --cifar-n 0 skips the CIFAR-10 step
    assert steps[0][steps[0].index("--n-examples") + 1] == "1000"
    assert "trainer.epochs=1" in steps[2]


@pytest.mark.parametrize("absolute", [False, True])
def test_printed_paths_are_relative_to_the_current_folder(steps, capsys, tmp_path, absolute):
    """`--out` given absolute (or as Make passes it) but under the current folder is printed
    relative to it: short, and still usable from here."""
    out = tmp_path / "runs" / "demo" if absolute else "runs/demo"
    assert main(["demo", "--out", str(out), "--cifar-n", "2", "--mnist-n", "2",
                 "--sensitivity-n", "2", "--inspect-n", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path) not in printed
    look = printed[printed.index("Look at:"):]
    assert "everything          runs/demo/index.html  (open in a browser)" in look
    assert "runs/demo/inspect/index.html" in look
    assert "runs/demo/sensitivity/sigma_mean.png" in look
    assert "tensorboard --logdir runs/demo " in look
    assert "step 7/7  write runs/demo/index.html" in printed
    assert Path("runs/demo/index.html").is_file()  # the printed path opens from here


def test_a_path_outside_the_current_folder_stays_absolute(tmp_path, monkeypatch):
    inside = tmp_path / "here"
    inside.mkdir()
    monkeypatch.chdir(inside)
    assert demo.shown(inside / "runs" / "demo") == "runs/demo"
    assert demo.shown("runs/demo") == "runs/demo"
    assert demo.shown(tmp_path / "elsewhere" / "demo") == str(tmp_path / "elsewhere" / "demo")
    assert demo.shown(inside) == "."
