"""``robustkit demo``: flags, ``robustkit.demo.run`` (the whole pipeline, a library call), print.

Every bad flag is one line and exit code 2 before any step runs; ``--quick`` runs the same steps
at tiny sizes (about a minute on two CPU cores, no CIFAR-10 step) and the page says so.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from robustkit.cli import CLIError, user_input

# flag -> help; the values are read as text and checked by robustkit.demo.check_sizes
_SIZES = {"cifar_n": "CIFAR-10 test images evaluated, 0..1000 (100, quick 0: skipped)",
          "mnist_n": "MNIST test images evaluated, 1..1000 (200, quick 32)",
          "sensitivity_n": "MNIST test images of the sensitivity step, 2..1000 (200, quick 32)",
          "inspect_n": "MNIST test images of the saliency comparison, 2..1000 (12, quick 4)",
          "epochs": "override trainer.epochs, 1..1000 (4, quick 1)"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="end-to-end demo on the shipped samples (make demo)",
        description="Evaluate pyautoattack's standard CIFAR-10 ResNet-18 and the shipped MNIST "
        "SmallCNN pair on the embedded samples, train a robust SmallCNN live (SRD-DAT) and "
        "evaluate it, compare the three MNIST models' neuron sensitivity and saliency, and "
        "write OUT/index.html with everything (robustkit.demo.run).")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, no CIFAR-10 step and no "
                   "AutoAttack, one short epoch: about a minute (the flags below override)")
    for name, text in _SIZES.items():
        p.add_argument(f"--{name.replace('_', '-')}", metavar="N", help=text)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(run=run)


def sizes_from(args):
    """The ``Sizes`` the flags ask for (``--quick`` or the full demo, then each given flag)."""
    from robustkit import demo

    given = {n: getattr(args, n) for n in _SIZES if getattr(args, n) is not None}
    for name, text in given.items():
        try:
            given[name] = int(str(text).strip())
        except ValueError:
            raise CLIError(f"--{name.replace('_', '-')} {text!r}: expected an integer") from None
    sizes = dataclasses.replace(demo.QUICK if args.quick else demo.FULL, **given)
    try:
        demo.check_sizes(sizes)
    except ValueError as err:  # "mnist_n 0: must lie in [1, 1000]" -> "--mnist-n 0: ..."
        name, _, rest = str(err).partition(" ")
        raise CLIError(f"--{name.replace('_', '-')} {rest}") from None
    return sizes, ["--quick"] * args.quick + [f"--{n.replace('_', '-')}={v}"
                                              for n, v in given.items()]


def shown(path: str | Path) -> str:
    """``path`` relative to the current folder when it lies under it, else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path)


def run(args) -> int:
    from robustkit import demo
    from robustkit.cli.progress import ProgressCallback, tqdm_factory
    from robustkit.utils import check_writable, resolve_device

    sizes, flags = sizes_from(args)
    with user_input(CLIError, f"--device {args.device!r}", (ValueError, RuntimeError)):
        resolve_device(args.device)
    check_writable(args.out, "--out")
    flags += [f"--out={args.out}"] * (args.out != "runs/demo") + \
        [f"--device={args.device}"] * (args.device != "cpu")
    res = demo.run(args.out, sizes, device=args.device, command=shlex.join(
        ["robustkit", "demo", *flags]), progress=tqdm_factory(),
        train_callbacks=[ProgressCallback()])
    out, sens = res.out, res.out / "sensitivity"
    print(f"\n{res.table()}\n\nLook at:\n  everything          {shown(res.page)}  (open in a "
          f"browser)\n  saliency            {shown(out / 'inspect' / 'index.html')}, "
          f"grid_adaptgrad.png\n  neuron sensitivity  {shown(sens / 'sigma_mean.png')}, "
          "sigma_hist.png, intervention.png, sensitivity.json\n  training            "
          f"tensorboard --logdir {shlex.quote(shown(out))}  (scalars, sigma histograms, saliency "
          f"panels)\n({'quick run, ' if sizes.quick else ''}total {res.seconds:.0f} s)")
    return 0
