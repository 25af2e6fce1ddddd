"""``robustkit demo``: flags, ``robustkit.demo.run`` (the whole pipeline, a library call), print.

Every bad flag is one line and exit code 2 before any step runs; ``--quick`` runs the same steps
at tiny sizes (about a minute on two CPU cores, no CIFAR-10 step) and the page says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path

from robustkit.cli import CLIError

_FLAGS = ("cifar_n", "mnist_n", "sensitivity_n", "inspect_n", "epochs")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="end-to-end demo on the shipped samples (make demo)",
        description="Evaluate the standard ResNet-18 shipped in pyautoattack on the embedded "
        "CIFAR-10 sample and robustkit's shipped standard/robust MNIST SmallCNN pair on the "
        "embedded MNIST sample, train a small robust SmallCNN live (SRD-DAT) and evaluate it, "
        "compare the neuron sensitivity and the saliency (AdaptGrad) of the three MNIST models, "
        "and write OUT/index.html with everything.")
    a = p.add_argument
    a("--out", default="runs/demo", help="output folder (default runs/demo)")
    a("--quick", action="store_true", help="tiny sizes, no CIFAR-10 step, one short epoch: "
      "about a minute; the other flags still override its sizes")
    # Read as text, checked by robustkit.demo.check_sizes before any step runs.
    a("--cifar-n", metavar="N", help="CIFAR-10 test images evaluated, 0..1000 (100, quick 0; "
      "0 skips the step)")
    a("--mnist-n", metavar="N", help="MNIST test images evaluated, 1..1000 (200, quick 32)")
    a("--sensitivity-n", metavar="N",
      help="MNIST test images of the sensitivity comparison, 2..1000 (200, quick 32)")
    a("--inspect-n", metavar="N",
      help="MNIST test images of the saliency comparison, 2..1000 (12, quick 4)")
    a("--epochs", metavar="N", help="override trainer.epochs, 1..1000 (4, quick 1)")
    a("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(run=run)


def sizes_from(args: argparse.Namespace):
    """The ``Sizes`` the flags ask for (``--quick`` or the full demo, then each given flag)."""
    from robustkit import demo

    given = {}
    for name in _FLAGS:
        text = getattr(args, name)
        if text is not None:
            try:
                given[name] = int(str(text).strip())
            except ValueError:
                raise CLIError(f"--{name.replace('_', '-')} {text!r}: expected an integer")\
                    from None
    sizes = dataclasses.replace(demo.QUICK if args.quick else demo.FULL, **given)
    try:
        demo.check_sizes(sizes)
    except ValueError as err:  # "mnist_n 0: must lie in [1, 1000]" -> "--mnist-n 0: ..."
        name, _, rest = str(err).partition(" ")
        raise CLIError(f"--{name.replace('_', '-')} {rest}") from None
    return sizes


def shown(path: str | Path) -> str:
    """``path`` relative to the current folder when it lies under it, else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path)


def run(args: argparse.Namespace) -> int:
    from robustkit import demo
    from robustkit.cli.progress import ProgressCallback, tqdm_factory
    from robustkit.utils import check_writable, resolve_device

    sizes = sizes_from(args)
    try:
        resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        raise CLIError(f"--device {args.device!r}: {' '.join(str(err).split())}") from None
    check_writable(args.out, "--out")
    flags = [*(["--quick"] if args.quick else []),
             *(f"--{n.replace('_', '-')}={getattr(args, n)}" for n in _FLAGS
               if getattr(args, n) is not None),
             *([f"--out={args.out}"] if args.out != "runs/demo" else []),
             *([f"--device={args.device}"] if args.device != "cpu" else [])]
    command = shlex.join(["robustkit", "demo", *flags])
    res = demo.run(args.out, sizes, device=args.device, command=command,
                   progress=tqdm_factory(), train_callbacks=[ProgressCallback()])
    out = res.out
    print(f"\n{res.table()}")
    print(f"\nLook at:\n  everything          {shown(res.page)}  (open in a browser)"
          f"\n  saliency            {shown(out / 'inspect' / 'index.html')}, grid_adaptgrad.png"
          f"\n  neuron sensitivity  {shown(out / 'sensitivity' / 'sigma_mean.png')}, "
          "sigma_hist.png, intervention.png, sensitivity.json"
          f"\n  training            tensorboard --logdir {shlex.quote(shown(out))}  (scalars, "
          "sigma histograms, saliency panels)"
          f"\n({'quick run, ' if sizes.quick else ''}total {res.seconds:.0f} s)")
    return 0
