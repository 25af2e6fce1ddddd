"""``robustkit sensitivity``: neuron sensitivity of one or more models (methods.md §4, issue #12).

Wiring only: the flags become models and one set of benign images; ``robustkit.sensitivity.
compare`` makes the adversarial pairs, measures σ, ranks neurons, runs the intervention test and
the bootstrap; the CLI prints ``report.table()`` and ``report.save(out)`` writes
``<out>/sensitivity.json``, three PNG figures, ``<out>/tb/<label>/`` and, with ``--save-adv``,
``<out>/adv.pt``: exactly what ``compare(...).save(out)`` writes in Python.

Adversarial pairs follow the paper's measurement (methods.md §4.1 [R]): PGD, L∞, α = ε/4, a
uniform random start, no early stop and the *last* iterate (full strength on every image, unlike
``robustkit evaluate``'s best-iterate, stop-on-success PGD), white-box against each model, or one
x' set made on ``--source-model`` so that every model sees identical pairs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from robustkit.cli import MODEL_FORMS, CLIError, user_input
from robustkit.cli.compare import add_flags, integer, load, parse
from robustkit.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


EPILOG = MODEL_FORMS + """\
  Repeat --model to compare models; --checkpoint and --name apply to the --model just before
  them. A model is labelled as robustkit evaluate names it (registry name, FN, zoo name); two
  models with one name get @<checkpoint folder> (else @<checkpoint stem>) appended, or give
  --name.

adversarial pairs (x, x'): the first N test images; x' by --attack pgdK (CE loss) or cwK
  (CW margin loss): K steps, L-inf, alpha = eps/4, uniform random start, no early stop, the LAST
  iterate (the paper's full-strength pairs; not evaluate's best-iterate early-stopped PGD).
  Default: white-box against each measured model. --source-model M: one x' set made on M (a
  --model label or spec, or any other model, with --source-checkpoint), so every model is
  measured on identical pairs (a transfer attack for the others).

measured per model and layer (neuron = output channel; methods.md section 4):
  sigma_m     1/N sum_n 1/(HW) |F_m(x_n) - F_m(x'_n)|_1 (--reduction elementwise), or MindArmour's
              sum_n |mean F_m(x_n) - mean F_m(x'_n)| (spatial_mean: sums over images)
  mean/median of sigma over the layer's neurons, with a 95% BCa bootstrap CI of the mean over
  images (scipy.stats.bootstrap, 9999 resamples); relative_mean: mean of sigma divided by the
  clean features' magnitude (compares models); topk_mean: mean sigma of the k = ceil(ratio*C)
  most sensitive neurons; intervention: accuracy on x' with those k neurons set to their clean
  values (topk) vs k random ones (random, mean over --draws); top-k overlap (Jaccard) of the
  first model with each other one. Models with different layers compare the common ones only.

output (--out DIR):
  sensitivity.json  {"models": {LABEL: {"attack", "eps", "n", "adv_accuracy", "clean_accuracy",
                      "layers": {LAYER: {"mean", "median", "relative_mean", "topk_mean",
                      "ci95": [lo, hi], "intervention": {"topk", "random"}, "k", "channels",
                      "topk_neurons"}}, "skipped_layers", ...}},
                     "common_layers": [...], "pairs": [{"a", "b", "jaccard": {LAYER: J}}],
                     "settings": {...}}
  sigma_mean.png    mean sigma per layer, models side by side, CI whiskers
  sigma_hist.png    sigma histograms, one panel per layer, models overlaid
  intervention.png  accuracy on x', x' with k random / top-k neurons restored, and on x
  tb/LABEL/         TensorBoard histograms sigma/LAYER (tensorboard --logdir DIR/tb)
  adv.pt            with --save-adv: {"x_adv": {LABEL: x'}, "y": labels}

example:
  robustkit sensitivity --dataset cifar10 --model preact_resnet18 --checkpoint runs/nat/best.pt \\
      --model preact_resnet18 --checkpoint runs/at/best.pt --layers auto --out runs/sens
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sensitivity", help="neuron sensitivity of one or more models (sigma, top-k, "
                            "intervention test, figures)",
        description="Measure how much each neuron's output changes between benign and "
                    "adversarial images (neuron sensitivity, Zhang et al., IEEE TIP 2021), "
                    "rank the neurons, test whether the most sensitive ones carry the attack, "
                    "and compare models layer by layer.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, "measure", n="1000", batch="256", attack=", no early stop")
    a = p.add_argument
    a("--layers", default="auto", help="auto (every conv and linear module, default) or comma-"
      "separated module names or unique ends of them (conv2 for model.feature_extractor.conv2); "
      "outputs name each layer by its full module name")
    a("--reduction", choices=("elementwise", "spatial_mean"), default="elementwise",
      help="sigma convention: elementwise (paper, default) or spatial_mean (MindArmour)")
    a("--source-model", metavar="M", help="make x' once on M (a --model label or spec, or "
                                          "another model spec) and measure every model on it")
    a("--source-checkpoint", metavar="PATH",
      help="weights of a --source-model that is not one of the --model entries")
    a("--ratio", default="0.1", help="top-k ratio rho: k = ceil(rho * channels) (default 0.1)")
    a("--draws", default="5", help="random k-neuron sets in the intervention test (default 5)")
    a("--x-adv", metavar="FILE", help="measure on these x' instead of attacking: the adv.pt of "
      "--save-adv, or one (N, C, H, W) tensor for every model (refused with --attack or "
      "--source-model, which make x')")
    a("--save-adv", action="store_true", help="also write the adversarial images to DIR/adv.pt")
    p.set_defaults(run=run)


def run(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from robustkit.cli.progress import tqdm_factory
    from robustkit.evaluation.api import source_model
    from robustkit.evaluation.results import format_eps
    from robustkit.sensitivity import common_layers, compare
    from robustkit.sensitivity.pairs import load_pairs

    c = parse(args, n_min=2)  # a bootstrap needs two images
    layers = "auto" if args.layers.strip() == "auto" else [
        s.strip() for s in args.layers.split(",") if s.strip()]
    if not layers:
        raise CLIError(f"--layers {args.layers!r}: give auto or module names")
    try:
        ratio = float(args.ratio)
    except ValueError:
        raise CLIError(f"--ratio {args.ratio!r}: expected a number in (0, 1]") from None
    if not 0 < ratio <= 1:
        raise CLIError(f"--ratio {args.ratio!r}: must lie in (0, 1]")
    draws = integer(args.draws, "--draws", 1)
    if args.x_adv is not None and args.source_model is not None:
        raise CLIError("--x-adv gives the x' of every model; --source-model makes them: give one")
    if args.x_adv is not None and args.attack is not None:
        raise CLIError(f"--x-adv gives x', --attack {args.attack} makes it: give one")
    if args.x_adv is not None and not Path(args.x_adv).is_file():
        raise CLIError(f"--x-adv {args.x_adv!r}: file not found")
    out, device, x, y, _, models = load(args, c)
    x_adv = None
    if args.x_adv is not None:  # read weights-only; NaN, shapes, ranges, labels: one line
        with user_input(DataError, f"--x-adv {args.x_adv}"):
            x_adv = load_pairs(args.x_adv, c.labels, x, y)
    with user_input(ConfigError, "--layers"):
        common_layers(models, layers)  # a bad name is one line naming the flag, before any work
    source, source_net = source_model(args.source_model, c.entries, c.labels,
                                      args.source_checkpoint, args.dataset, device)
    logger.info("neuron sensitivity of %s on the first %d %s test images; %s", ", ".join(
        c.labels), c.n, args.dataset, f"x' from {args.x_adv}" if x_adv is not None else
        f"{c.attack}, Linf eps={format_eps(c.eps)}, " + (
            f"x' transferred from {source}" if source else "white-box on each model"))
    with logging_redirect_tqdm():
        report = compare(
            models, x, y, attack=None if x_adv is not None else c.attack, eps=c.eps,
            x_adv=x_adv, source=source, source_model=source_net,
            layers=layers, reduction=args.reduction, ratio=ratio, draws=draws,
            batch_size=c.batch_size, seed=c.seed, model_info=c.model_info, about=c.about,
            progress=tqdm_factory(False if args.no_progress else None))
    path = report.save(out, save_adv=args.save_adv)
    print(report.table())
    figures = ", ".join(str(out / f) for f in report.to_dict()["figures"])
    print(f"results: {path}\nfigures: {figures}\nTensorBoard: tensorboard --logdir {out / 'tb'}")
    return 0
