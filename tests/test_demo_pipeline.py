"""``robustkit.demo.run`` end to end (issue 19 §3): every step through the library calls, the
files each command writes, the kinds decided from the strongest evaluation and used by the
saliency step, the page's header, warnings and training figure.

The default suite runs the pipeline at the smallest sizes (seconds of compute); ``robustkit demo
--quick`` through the CLI, about a minute on two idle cores, is a slow test, as is the full demo
from the wheel (tests/test_demo.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from robustkit import demo
from robustkit.demo import PAIR, QUICK, Sizes, model_kind

TINY = dataclasses.replace(QUICK, mnist_n=4, sensitivity_n=2, inspect_n=2, train_n=128)
LABELS = (*PAIR, "demo_srd_dat")


def _check_outputs(res, out, sizes):
    assert res.out == out and res.page == out / "index.html" and res.sizes == sizes
    assert list(res.evaluations) == list(LABELS)
    for label in LABELS:
        saved = json.loads((out / f"eval_{label}" / "results.json").read_text())
        assert saved == res.evaluations[label] and saved["n_examples"] == sizes.mnist_n
        assert ("autoattack" in saved["accuracy"]) == sizes.autoattack
        # the kind on the page and in the saliency step: from this evaluation
        assert res.kinds[label] == model_kind(saved)
    assert res.kinds[PAIR[0]]["kind"] == "standard"  # 0 % under PGD-40 even on 4 images
    assert (out / "srd_dat" / "last.pt").is_file() and res.runs == {"srd_dat": out / "srd_dat"}
    epochs = [json.loads(line) for line in (out / "srd_dat" / "metrics.jsonl").read_text()
              .splitlines() if '"epoch"' in line and '"type": "epoch"' in line]
    assert [e["epoch"] for e in epochs] == [sizes.epochs] and "eval/clean" in epochs[0]
    sens = json.loads((out / "sensitivity" / "sensitivity.json").read_text())
    assert set(sens["models"]) == set(LABELS) and (out / "sensitivity" / "sigma_mean.png").is_file()
    summary = json.loads((out / "inspect" / "summary.json").read_text())
    assert summary["n"] == sizes.inspect_n and set(summary["models"]) == set(LABELS)
    for label in LABELS:
        entry = summary["models"][label]
        assert entry["kind"] == res.kinds[label]["kind"]
        attacks = "pgd40, autoattack" if sizes.autoattack else "pgd40"
        assert entry["kind_source"] == ("from the strongest evaluation: worst case over "
                                        f"{attacks}, robust at >= 20 % of the images")
    page = res.page.read_text()
    assert f"computed by <code>{res.command}</code>" in page
    assert f"with {sizes.describe()}" in page
    assert ("(quick run)" in page) == sizes.quick
    assert page.count('src="data:image/png;base64,') == 1  # the held-out accuracy curves
    assert "inspect/grid_adaptgrad.png" in page and "sensitivity/sigma_mean.png" in page
    return page


def test_the_pipeline_at_the_smallest_sizes(tmp_path):
    out = tmp_path / "demo"
    res = demo.run(out, TINY, command="robustkit demo --quick --mnist-n=4")
    page = _check_outputs(res, out, TINY)
    assert "robustkit demo --quick --mnist-n=4" in page
    table = res.table()
    assert "quick run: no AutoAttack, PGD-40 only" in table
    assert all(f"{lb} " in table for lb in LABELS)
    assert res.seconds > 0


def test_sizes_are_checked_before_any_work(tmp_path):
    for bad, named in [(dataclasses.replace(QUICK, mnist_n=0), "mnist_n 0: must lie in [1, 1000]"),
                       (dataclasses.replace(QUICK, cifar_n=1001), "cifar_n 1001: must lie in"),
                       (dataclasses.replace(QUICK, epochs=0), "epochs 0: must lie in [1, 1000]"),
                       (dataclasses.replace(QUICK, train_n=9999), "train_n 9999: must lie in"),
                       (dataclasses.replace(QUICK, cifar_n=True), "cifar_n True: must lie"),
                       (dataclasses.replace(QUICK, sensitivity_n=1), "sensitivity_n 1: must")]:
        with pytest.raises(ValueError) as err:
            demo.run(tmp_path / "never", bad)
        assert str(err.value).startswith(named), err.value
    assert not (tmp_path / "never").exists()  # refused before the folder was made
    demo.check_sizes(Sizes())  # the full demo's sizes are valid
    demo.check_sizes(QUICK)


def test_quick_and_full_sizes():
    assert QUICK.quick and QUICK.cifar_n == 0 and not QUICK.autoattack and QUICK.epochs == 1
    assert QUICK.attacks == "clean,pgd40"
    full = Sizes()
    assert not full.quick and full.autoattack and full.attacks == "clean,pgd40,autoattack"
    assert full.describe() == ("cifar_n=100, mnist_n=200, sensitivity_n=200, inspect_n=12, "
                               "autoattack=True")


@pytest.mark.slow
def test_demo_quick_through_the_cli(tmp_path, monkeypatch, capsys):
    from robustkit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--out", "q"]) == 0
    printed = capsys.readouterr().out
    assert "quick run, total" in printed and "kind" in printed
    out = tmp_path / "q"
    res = demo.DemoResult(out=out, sizes=QUICK, command="robustkit demo --quick --out=q",
                          evaluations={lb: json.loads((out / f"eval_{lb}" / "results.json")
                                                      .read_text()) for lb in LABELS},
                          kinds={}, sensitivity=None, saliency=None, runs={"srd_dat":
                                                                           out / "srd_dat"},
                          page=out / "index.html", seconds=1.0)
    res.kinds = {lb: model_kind(r) for lb, r in res.evaluations.items()}
    _check_outputs(res, out, QUICK)
