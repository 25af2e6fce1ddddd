"""``robustkit inspect --target --subset --correction`` (issue #20): the CLI forwards the flags to
``saliency.compare`` (the same summary.json as the library call), prints the choices, n after
subsetting and the correction's family, and refuses a subset under two images in one line.

The shipped MNIST pair classifies the first 8 sample images correctly; the label of image 0 is
changed here so that correct-by-all has an image to drop.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from robustkit.cli import main

N, STEPS = 8, 2
MODELS = ["robustkit:mnist_smallcnn_standard", "robustkit:mnist_smallcnn_robust"]


def _images(wrong: list[int]):
    """The first N sample-mnist test images, the labels of ``wrong`` shifted by one."""
    from robustkit.data import load

    x, y = load("sample-mnist", n=N)
    y = y.clone()
    y[wrong] = (y[wrong] + 1) % 10
    return x, y


def _cli(tmp, wrong, *flags):
    import robustkit.evaluation.api as api

    with pytest.MonkeyPatch.context() as mp, \
            contextlib.redirect_stdout(io.StringIO()) as printed:
        mp.setattr(api, "load_test_images", lambda *a: (*_images(wrong), None))
        code = main(["inspect", "--dataset", "sample-mnist", "--model", MODELS[0], "--model",
                     MODELS[1], "--n-examples", str(N), "--attack", f"pgd{STEPS}",
                     "--explainers", "gradient", "--device", "cpu", "--no-progress",
                     "--no-tensorboard", "--out", str(tmp), *flags])
    return code, printed.getvalue()


def test_the_flags_reach_the_library_and_are_printed(tmp_path):
    from robustkit.models import load_pretrained
    from robustkit.saliency import compare

    code, printed = _cli(tmp_path / "cli", [0], "--target", "true", "--subset",
                         "correct-by-all", "--correction", "bh")
    assert code == 0
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    s = summary["settings"]
    assert (s["target"], s["subset"], s["n_given"], s["n"]) == ("true", "correct-by-all", N,
                                                                N - 1)
    assert s["subset_indices"] == list(range(1, N))
    assert s["correction"]["method"] == "bh"
    assert f"saliency on {N - 1} of the first {N} sample-mnist test images (subset " \
           "correct-by-all" in printed
    assert "target = true (the true label)" in printed
    assert f"Benjamini-Hochberg correction over the family of m = {s['correction']['m']}" \
        in printed
    x, y = _images([0])
    labels = [m.split(":")[1] for m in MODELS]  # as the CLI labels them
    report = compare({lb: load_pretrained(lb) for lb in labels}, x, y, explainers=["gradient"],
        attack=f"pgd{STEPS}", eps=0.3, target="true", subset="correct-by-all",
        correction="bh", kinds=dict(zip(labels, ["standard", "robust"], strict=True)),
        kind_source="model card",
        model_info={lb: {"model": m, "checkpoint": None}
                    for lb, m in zip(labels, MODELS, strict=True)},
        about={"dataset": "sample-mnist", "split": "test", "device": "cpu"})
    report.save(tmp_path / "lib", tensorboard=False)
    for name in ("summary.json", "index.html", "metrics_long.html", "metrics.csv"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes()


def test_the_defaults_are_predicted_all_holm(tmp_path):
    code, printed = _cli(tmp_path, [0])
    assert code == 0
    s = json.loads((tmp_path / "summary.json").read_text())["settings"]
    assert (s["target"], s["subset"], s["n"], s["correction"]["method"]) == (
        "predicted", "all", N, "holm")
    assert "target = predicted" in printed and "Holm correction" in printed


def test_a_subset_of_under_two_images_is_one_line(tmp_path, capsys):
    code, _ = _cli(tmp_path, list(range(N - 1)), "--subset", "correct-by-all")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("robustkit inspect: error:"), err
    assert f"keeps 1 of the {N} images" in err


@pytest.mark.parametrize("flag, value", [("--target", "label"), ("--subset", "some"),
                                         ("--correction", "bonferroni")])
def test_bad_choices_exit_2(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "--dataset", "sample-mnist", "--model", MODELS[0], "--out",
              str(tmp_path), flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err


def test_images_labels_are_as_the_test_says():
    x, y = _images([])
    from robustkit.models import load_pretrained

    with torch.no_grad():
        for m in MODELS:
            assert torch.equal(load_pretrained(m.split(":")[1])(x).argmax(1), y)
