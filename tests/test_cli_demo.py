"""``robustkit demo``'s flags and what it prints, without running its steps (the library call
``robustkit.demo.run`` is a stub here): every bad flag is one line and exit code 2 before any
work (``--cifar-n -1`` once ran the whole demo), ``--quick`` and the size flags become the
``Sizes`` passed on, the command is recorded for the page, and the paths it prints are relative
to the current folder when they lie under it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from robustkit.cli import demo, main


@pytest.fixture
def steps(monkeypatch, tmp_path):
    """The demo with its library call (robustkit.demo.run) replaced by a stub that writes the
    page; returns the list of calls (empty when a flag is refused before any work)."""
    from robustkit import demo as library

    calls: list[dict] = []

    def fake_run(out, sizes, **kw):
        calls.append({"out": out, "sizes": sizes, **kw})
        out = Path(out)
        (out / "index.html").write_text("<html></html>")
        return library.DemoResult(
            out=out, sizes=sizes, command=kw["command"], evaluations={
                lb: {"dataset": "sample-mnist", "accuracy": {"clean": 1.0, "pgd40": 0.5}}
                for lb in (*library.PAIR, "demo_srd_dat")},
            kinds={lb: {"kind": "robust"} for lb in library.PAIR}, sensitivity=None,
            saliency=None, runs={}, page=out / "index.html", seconds=1.0)

    monkeypatch.setattr(library, "run", fake_run)
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
    (["--quick", "--mnist-n", "0"], r"--mnist-n 0: must lie in \[1, 1000\]"),
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
    from robustkit.demo import FULL, Sizes

    rc = main(["demo", "--out", "out", "--cifar-n", "0", "--mnist-n", "1000",
               "--sensitivity-n", "2", "--inspect-n", "2", "--epochs", "1"])
    assert rc == 0, capsys.readouterr().err
    (call,) = steps
    assert call["sizes"] == Sizes(cifar_n=0, mnist_n=1000, sensitivity_n=2, inspect_n=2,
                                  epochs=1)
    assert call["command"] == ("robustkit demo --cifar-n=0 --mnist-n=1000 --sensitivity-n=2 "
                               "--inspect-n=2 --epochs=1 --out=out")
    assert call["device"] == "cpu" and len(call["train_callbacks"]) == 1
    steps.clear()
    assert main(["demo"]) == 0 and steps[0]["sizes"] == FULL
    assert steps[0]["command"] == "robustkit demo"


def test_quick_takes_the_quick_sizes_and_flags_override_them(steps, capsys):
    from robustkit.demo import QUICK

    assert main(["demo", "--quick"]) == 0
    assert steps[0]["sizes"] == QUICK and steps[0]["command"] == "robustkit demo --quick"
    assert QUICK.quick and QUICK.cifar_n == 0 and not QUICK.autoattack
    assert "(quick run, total 1 s)" in capsys.readouterr().out
    assert main(["demo", "--quick", "--mnist-n", "8"]) == 0
    assert steps[1]["sizes"].mnist_n == 8 and steps[1]["sizes"].epochs == QUICK.epochs
    assert steps[1]["command"] == "robustkit demo --quick --mnist-n=8"


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
    assert "demo_srd_dat" in printed and "kind" in printed  # the table, with the kinds
    assert Path("runs/demo/index.html").is_file()  # the printed path opens from here


def test_a_path_outside_the_current_folder_stays_absolute(tmp_path, monkeypatch):
    inside = tmp_path / "here"
    inside.mkdir()
    monkeypatch.chdir(inside)
    assert demo.shown(inside / "runs" / "demo") == "runs/demo"
    assert demo.shown("runs/demo") == "runs/demo"
    assert demo.shown(tmp_path / "elsewhere" / "demo") == str(tmp_path / "elsewhere" / "demo")
    assert demo.shown(inside) == "."
