"""``robustkit demo``: the end-to-end pipeline behind ``make demo``, on the shipped samples only.

1. Evaluate a real pretrained model, the standard CIFAR-10 ResNet-18 that ships inside
   ``pyautoattack``, on the first ``--cifar-n`` images of the embedded CIFAR-10 test sample
   (clean, PGD-20, AutoAttack ``custom`` = APGD-CE + APGD-T).
2. Evaluate the shipped reference pair ``robustkit:mnist_smallcnn_standard`` and
   ``robustkit:mnist_smallcnn_robust`` (clean, PGD-40, the cheap AutoAttack on the first
   ``--mnist-n`` test images of the embedded MNIST sample).
3. Train a natural and an SRD-DAT SmallCNN on the embedded MNIST sample
   (``robustkit/cli/demo_configs/*.yaml``, package data), with TensorBoard logs under
   ``runs/demo/``, and evaluate both the same way.
4. Compare the neuron sensitivity of the shipped pair (``robustkit sensitivity``: table, JSON,
   PNG figures) and print one comparison table of every MNIST model.

Everything is a call of the ``train`` and ``evaluate`` subcommands, so the demo exercises
exactly what a user runs. It needs only the installed package (its configs are package data,
the ResNet-18 factory is ``robustkit.testing.pyautoattack_resnet18``), not a source checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from robustkit.cli import CLIError

MODELS = ("natural", "srd_dat")  # robustkit/cli/demo_configs/<name>.yaml, trained in this order
PAIR = ("mnist_smallcnn_standard", "mnist_smallcnn_robust")  # shipped: robustkit:<name>


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="end-to-end demo on the shipped samples (make demo)",
        description=(
            "Evaluate the standard ResNet-18 shipped in pyautoattack on the embedded CIFAR-10 "
            "sample and robustkit's shipped standard/robust MNIST SmallCNN pair on the embedded "
            "MNIST sample, train a natural and an SRD-DAT SmallCNN live, evaluate them, compare "
            "the neuron sensitivity of the shipped pair and print a comparison."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--cifar-n", type=int, default=100, help="CIFAR-10 images evaluated (100)")
    p.add_argument("--mnist-n", type=int, default=200, help="MNIST test images evaluated (200)")
    p.add_argument("--sensitivity-n", type=int, default=200,
                   help="MNIST test images of the sensitivity comparison (200)")
    p.add_argument("--epochs", type=int, default=None, help="override trainer.epochs")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(run=run)


def _call(argv: list[str]) -> None:
    from robustkit.cli import main

    code = main(argv)
    if code:
        raise CLIError(f"step `robustkit {' '.join(argv)}` failed with exit code {code}")


@contextlib.contextmanager
def resources_used() -> Iterator[tuple[dict[str, Path], str]]:
    """The demo's inputs inside the installed package: ``({name: config path}, model spec)``.

    ``as_file`` gives real paths even from a zipped install; the model spec is the
    ``FILE.py:FN`` form of ``--model`` pointing at ``robustkit/testing.py``.
    """
    with contextlib.ExitStack() as stack:
        folder = resources.files("robustkit.cli").joinpath("demo_configs")
        configs = {m: stack.enter_context(resources.as_file(folder.joinpath(f"{m}.yaml")))
                   for m in MODELS}
        testing = stack.enter_context(
            resources.as_file(resources.files("robustkit").joinpath("testing.py")))
        yield configs, f"{testing}:pyautoattack_resnet18"


def run(args: argparse.Namespace) -> int:
    with resources_used() as (configs, factory):
        return _run(args, configs, factory)


def _run(args: argparse.Namespace, configs: dict[str, Path], factory: str) -> int:
    out = Path(args.out)
    start = time.perf_counter()
    # Cheap AutoAttack (the official APGD-CE + APGD-T, not the standard four-attack version),
    # cascaded: each attack runs only on the points the previous ones did not break, as AutoAttack
    # itself chains its attacks. Robust accuracy (per-example AND) is unchanged by the cascade;
    # the per-attack columns become cumulative. APGD runs all its 100 iterations on every point it
    # is given, so skipping points PGD already broke is what keeps the demo within minutes on CPU.
    aa = ["--aa-version", "custom", "--aa-attacks", "apgd-ce,apgd-t", "--protocol", "cascade"]

    total = 3 + 2 * len(MODELS)  # CIFAR-10, the pair, train + evaluate per model, sensitivity
    print(f"\n== step 1/{total}  standard ResNet-18 (pyautoattack) on the first {args.cifar_n} "
          "embedded CIFAR-10 test images, Linf eps 8/255 ==")
    _call(["evaluate", "--model", factory, "--dataset", "sample-cifar10",
           "--n-examples", str(args.cifar_n), "--attacks", "clean,pgd20,autoattack", *aa,
           "--out", str(out / "eval_cifar10_resnet18"), "--device", args.device])

    def evaluate_mnist(model: list[str], label: str) -> dict:
        eval_dir = out / f"eval_mnist_{label}"
        _call(["evaluate", *model, "--dataset", "sample-mnist", "--n-examples",
               str(args.mnist_n), "--attacks", "clean,pgd40,autoattack", *aa, "--out",
               str(eval_dir), "--device", args.device])
        return json.loads((eval_dir / "results.json").read_text())

    rows = {}
    print(f"\n== step 2/{total}  the shipped reference pair (robustkit:{PAIR[0]}, "
          f"robustkit:{PAIR[1]}) on the first {args.mnist_n} MNIST test images, Linf eps 0.3 ==")
    for name in PAIR:
        rows[name] = evaluate_mnist(["--model", f"robustkit:{name}"], name)
    for i, name in enumerate(MODELS):
        print(f"\n== step {3 + 2 * i}/{total}  train {name} SmallCNN on the embedded MNIST "
              "sample ==")
        run_dir = out / name
        # auto: a second `make demo` resumes its finished runs (nothing to train) instead of
        # being refused for overwriting them
        overrides = [f"trainer.out_dir={run_dir}", f"trainer.device={args.device}",
                     "trainer.resume=auto"]
        if args.epochs is not None:
            overrides.append(f"trainer.epochs={args.epochs}")
        _call(["train", "-c", str(configs[name]), *overrides])
        print(f"\n== step {4 + 2 * i}/{total}  evaluate {name} on the first {args.mnist_n} "
              "MNIST test images, Linf eps 0.3 ==")
        rows[f"demo_{name}"] = evaluate_mnist(
            ["--model", "small_cnn", "--checkpoint", str(run_dir / "last.pt"), "--name",
             f"demo_{name}"], name)

    print(f"\n== step {total}/{total}  neuron sensitivity of the shipped pair on the first "
          f"{args.sensitivity_n} MNIST test images (white-box PGD-20 on each, last iterate) ==")
    sens_dir = out / "sensitivity"
    _call(["sensitivity", *[a for n in PAIR for a in ("--model", f"robustkit:{n}")],
           "--dataset", "sample-mnist", "--n-examples", str(args.sensitivity_n), "--out",
           str(sens_dir), "--device", args.device])

    print(f"\nSmallCNN on MNIST (first {args.mnist_n} test images of the shipped sample, "
          "Linf eps 0.3; AutoAttack = custom APGD-CE + APGD-T, not the standard version; "
          "cascade: each column is accuracy under that attack and all before it)")
    keys = list(next(iter(rows.values()))["accuracy"])
    width = max(len(n) for n in rows) + 2
    print(f"{'model':<{width}}" + "".join(f"{k:>12}" for k in keys))
    for name, res in rows.items():
        print(f"{name:<{width}}" + "".join(f"{100 * res['accuracy'][k]:>11.1f}%" for k in keys))
    print(f"\nLook at:\n  neuron sensitivity  {sens_dir}/sigma_mean.png, sigma_hist.png, "
          f"intervention.png, sensitivity.json\n  TensorBoard         tensorboard --logdir {out}"
          f"\n(total {time.perf_counter() - start:.0f} s)")
    return 0
