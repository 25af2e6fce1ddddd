"""``robustkit demo``: the end-to-end pipeline behind ``make demo``, on the shipped samples only.

1. Evaluate a real pretrained model, the standard CIFAR-10 ResNet-18 that ships inside
   ``pyautoattack``, on the first ``--cifar-n`` images of the embedded CIFAR-10 test sample
   (clean, PGD-20, AutoAttack ``custom`` = APGD-CE + APGD-T); ``--cifar-n 0`` skips it.
2. Evaluate the shipped reference pair ``robustkit:mnist_smallcnn_standard`` and
   ``robustkit:mnist_smallcnn_robust`` (clean, PGD-40, the cheap AutoAttack on the first
   ``--mnist-n`` test images of the embedded MNIST sample).
3. Train a small robust SmallCNN live with SRD-DAT on the embedded MNIST sample
   (``robustkit/cli/demo_configs/srd_dat.yaml``, package data; TensorBoard logs with loss,
   sensitivity and saliency panels under ``runs/demo/``), and evaluate it the same way.
4. Compare the neuron sensitivity of the pair and the live model (``robustkit sensitivity``).
5. Inspect their saliency with Gradient, SmoothGrad and AdaptGrad (``robustkit inspect``).
6. Write ``runs/demo/index.html`` (``reports.demo``) and print a table and where to look.

Everything is a call of the ``train``, ``evaluate``, ``sensitivity`` and ``inspect`` subcommands,
so the demo exercises exactly what a user runs. It needs only the installed package (its config
is package data, the ResNet-18 factory is ``robustkit.testing.pyautoattack_resnet18``), not a
source checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from robustkit.cli import CLIError

MODELS = ("srd_dat",)  # robustkit/cli/demo_configs/<name>.yaml, trained live in this order
PAIR = ("mnist_smallcnn_standard", "mnist_smallcnn_robust")  # shipped: robustkit:<name>


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="end-to-end demo on the shipped samples (make demo)",
        description=(
            "Evaluate the standard ResNet-18 shipped in pyautoattack on the embedded CIFAR-10 "
            "sample and robustkit's shipped standard/robust MNIST SmallCNN pair on the embedded "
            "MNIST sample, train a small robust SmallCNN live (SRD-DAT) and evaluate it, compare "
            "the neuron sensitivity and the saliency (AdaptGrad) of the three MNIST models, and "
            "write OUT/index.html with everything."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    # Counts are read as text and checked by check_args before any step runs: one line and exit
    # code 2 for a bad value, instead of minutes of work and a failure at the step that uses it.
    p.add_argument("--cifar-n", metavar="N", default="100",
                   help="CIFAR-10 test images evaluated, 0..1000 (100; 0 skips the step)")
    p.add_argument("--mnist-n", metavar="N", default="200",
                   help="MNIST test images evaluated, 1..1000 (200)")
    p.add_argument("--sensitivity-n", metavar="N", default="200",
                   help="MNIST test images of the sensitivity comparison, 2..1000 (200)")
    p.add_argument("--inspect-n", metavar="N", default="12",
                   help="MNIST test images of the saliency comparison, 2..1000 (12)")
    p.add_argument("--epochs", metavar="N", default=None,
                   help=f"override trainer.epochs, 1..{MAX_EPOCHS}")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(run=run)


# flag -> (dataset whose test split it counts, smallest value); the largest is that split's size
COUNTS = {"--cifar-n": ("sample-cifar10", 0), "--mnist-n": ("sample-mnist", 1),
          "--sensitivity-n": ("sample-mnist", 2),  # a bootstrap needs two images
          "--inspect-n": ("sample-mnist", 2)}
MAX_EPOCHS = 1000  # a demo, not a training run; a typo (10000) would run for days


def _integer(text: str, flag: str, lo: int, hi: int) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected an integer in [{lo}, {hi}]") from None
    if not lo <= value <= hi:
        raise CLIError(f"{flag} {value}: must lie in [{lo}, {hi}]")
    return value


def check_args(args: argparse.Namespace) -> None:
    """Check every flag before the first step and replace the counts by ints (in place).

    Raises:
        CLIError: a count that is not an integer or lies outside its range (the upper bound is
            the size of the shipped test sample it counts), ``--epochs`` outside
            ``[1, MAX_EPOCHS]``, an unusable ``--device``.
        OutputError: ``--out`` cannot be written.
    """
    from robustkit.data import load_dataset
    from robustkit.utils import check_writable, resolve_device

    sizes: dict[str, int] = {}
    for flag, (dataset, lo) in COUNTS.items():
        if dataset not in sizes:
            sizes[dataset] = len(load_dataset(dataset, "test"))
        dest = flag[2:].replace("-", "_")
        setattr(args, dest, _integer(getattr(args, dest), flag, lo, sizes[dataset]))
    if args.epochs is not None:
        args.epochs = _integer(args.epochs, "--epochs", 1, MAX_EPOCHS)
    try:
        resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        raise CLIError(f"--device {args.device!r}: {' '.join(str(err).split())}") from None
    check_writable(args.out, "--out")


def shown(path: str | Path) -> str:
    """``path`` as the demo prints it: relative to the current folder when it lies under it
    (short, and still a path the shell and the browser resolve from here), else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path)


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
    check_args(args)
    with resources_used() as (configs, factory):
        return _run(args, configs, factory)


def _run(args: argparse.Namespace, configs: dict[str, Path], factory: str) -> int:
    from robustkit.reports.demo import write_demo_page

    out = Path(args.out)
    start = time.perf_counter()
    # Cheap AutoAttack (the official APGD-CE + APGD-T, not the standard four-attack version),
    # cascaded: each attack runs only on the points the previous ones did not break, as AutoAttack
    # itself chains its attacks. Robust accuracy (per-example AND) is unchanged by the cascade;
    # the per-attack columns become cumulative. APGD runs all its 100 iterations on every point it
    # is given, so skipping points PGD already broke is what keeps the demo within minutes on CPU.
    aa = ["--aa-version", "custom", "--aa-attacks", "apgd-ce,apgd-t", "--protocol", "cascade"]
    steps = iter(range(1, 100))
    total = 4 + 2 * len(MODELS) + (args.cifar_n > 0)  # pair, per model, sensitivity, inspect, page

    def step(text: str) -> None:
        print(f"\n== step {next(steps)}/{total}  {text} ==")

    evaluations: dict[str, dict] = {}
    links: dict[str, str] = {}

    def evaluate(model: list[str], label: str, dataset: str, n: int, attacks: str) -> None:
        eval_dir = out / f"eval_{label}"
        _call(["evaluate", *model, "--dataset", dataset, "--n-examples", str(n), "--attacks",
               attacks, *aa, "--out", str(eval_dir), "--device", args.device])
        evaluations[label] = json.loads((eval_dir / "results.json").read_text())
        links[label] = f"eval_{label}/results.json"

    if args.cifar_n > 0:
        step(f"standard ResNet-18 (pyautoattack) on the first {args.cifar_n} embedded CIFAR-10 "
             "test images, Linf eps 8/255")
        evaluate(["--model", factory], "cifar10_resnet18", "sample-cifar10", args.cifar_n,
                 "clean,pgd20,autoattack")
    step(f"the shipped reference pair (robustkit:{PAIR[0]}, robustkit:{PAIR[1]}) on the first "
         f"{args.mnist_n} MNIST test images, Linf eps 0.3")
    mnist: dict[str, list[str]] = {}  # label -> its --model arguments
    for name in PAIR:
        mnist[name] = ["--model", f"robustkit:{name}"]
        evaluate(mnist[name], name, "sample-mnist", args.mnist_n, "clean,pgd40,autoattack")
    for name in MODELS:
        step(f"train a small robust model live: {name} SmallCNN on the embedded MNIST sample")
        run_dir = out / name
        # auto: a second `make demo` resumes its finished runs (nothing to train) instead of
        # being refused for overwriting them
        overrides = [f"trainer.out_dir={run_dir}", f"trainer.device={args.device}",
                     "trainer.resume=auto"]
        if args.epochs is not None:
            overrides.append(f"trainer.epochs={args.epochs}")
        _call(["train", "-c", str(configs[name]), *overrides])
        label = f"demo_{name}"
        step(f"evaluate {label} on the first {args.mnist_n} MNIST test images, Linf eps 0.3")
        mnist[label] = ["--model", "small_cnn", "--checkpoint", str(run_dir / "last.pt"),
                        "--name", label]
        evaluate(mnist[label], label, "sample-mnist", args.mnist_n, "clean,pgd40,autoattack")
    models = [a for spec in mnist.values() for a in spec]

    step(f"neuron sensitivity of the MNIST models on the first {args.sensitivity_n} test images "
         "(white-box PGD-20 on each, last iterate)")
    sens_dir = out / "sensitivity"
    _call(["sensitivity", *models, "--dataset", "sample-mnist", "--n-examples",
           str(args.sensitivity_n), "--out", str(sens_dir), "--device", args.device])

    step(f"saliency of the MNIST models (Gradient, SmoothGrad, AdaptGrad) on the first "
         f"{args.inspect_n} test images and their PGD-20 counterparts")
    inspect_dir = out / "inspect"
    _call(["inspect", *models, "--dataset", "sample-mnist", "--n-examples", str(args.inspect_n),
           "--explainers", "gradient,smoothgrad,adaptgrad", "--out", str(inspect_dir),
           "--device", args.device])

    step(f"write {shown(out / 'index.html')}")
    seconds = time.perf_counter() - start
    page = write_demo_page(
        out / "index.html", evaluations=evaluations, evaluation_links=links,
        sensitivity=json.loads((sens_dir / "sensitivity.json").read_text()),
        inspect=json.loads((inspect_dir / "summary.json").read_text()),
        runs=list(MODELS), seconds=seconds)

    rows = {k: v for k, v in evaluations.items() if v["dataset"] == "sample-mnist"}
    print(f"\nSmallCNN on MNIST (first {args.mnist_n} test images of the shipped sample, "
          "Linf eps 0.3; AutoAttack = custom APGD-CE + APGD-T, not the standard version; "
          "cascade: each column is accuracy under that attack and all before it)")
    keys = list(next(iter(rows.values()))["accuracy"])
    width = max(len(n) for n in rows) + 2
    print(f"{'model':<{width}}" + "".join(f"{k:>12}" for k in keys))
    for name, res in rows.items():
        print(f"{name:<{width}}" + "".join(f"{100 * res['accuracy'][k]:>11.1f}%" for k in keys))
    print(f"\nLook at:\n  everything          {shown(page)}  (open in a browser)"
          f"\n  saliency            {shown(inspect_dir / 'index.html')}, grid_adaptgrad.png"
          f"\n  neuron sensitivity  {shown(sens_dir / 'sigma_mean.png')}, sigma_hist.png, "
          f"intervention.png, sensitivity.json"
          f"\n  training            tensorboard --logdir {shlex.quote(shown(out))}  (scalars, "
          "sigma histograms, saliency panels)"
          f"\n(total {seconds:.0f} s)")
    return 0
