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

from robustkit.cli import CLIError, user_input
from robustkit.cli.compare import (
    PerModel,
    attack_spec,
    dataset_and_eps,
    integer,
    load_images,
    load_model_arg,
    model_entries,
    model_labels,
)
from robustkit.errors import ConfigError

logger = logging.getLogger(__name__)


EPILOG = """\
model forms (as in robustkit evaluate; repeat --model to compare models):
  NAME               a registry model (robustkit.models.MODELS), usually with --checkpoint
  FILE.py:FN         FN() returns an nn.Module taking [0, 1] inputs
  robustbench:NAME   a RobustBench zoo model;  robustkit:NAME  a shipped reference model
  --checkpoint and --name apply to the --model just before them. A model is labelled as
  robustkit evaluate names it (registry name, FN, zoo name); two models with one name get
  @<checkpoint folder> (else @<checkpoint stem>) appended, or give --name.

adversarial pairs (x, x'): the first N test images; x' by --attack pgdK (CE loss) or cwK
  (CW margin loss): K steps, L-inf, alpha = eps/4, uniform random start, no early stop, the LAST
  iterate (the paper's full-strength pairs; not evaluate's best-iterate early-stopped PGD).
  Default: white-box against each measured model. --source-model M: one x' set made on M (a
  --model label or spec, or any other model, with --source-checkpoint), so every model is
  measured on identical pairs (a transfer attack for the others).

layers: --layers auto, or module names; a layer has one name in every output, its full module
  name (model.feature_extractor.conv2 in the shipped SmallCNN); a unique end of it (conv2,
  feature_extractor.conv2) is accepted as an alias.

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
    a = p.add_argument
    a("--model", action=PerModel, metavar="SPEC",
      help="model to measure (repeatable): NAME | FILE.py:FN | robustbench:NAME | robustkit:NAME")
    a("--checkpoint", action=PerModel, metavar="PATH",
      help="weights of the --model just before it (loaded weights-only, strictly)")
    a("--name", action=PerModel, metavar="LABEL",
      help="label of the --model just before it (default: as robustkit evaluate names it)")
    a("--dataset", help="mnist, cifar10, cifar100, tinyimagenet, sample-mnist, sample-cifar10")
    a("--data-root", metavar="DIR", help="data folder (default $ROBUSTKIT_DATA, else ./data)")
    a("--eps", help="L-inf budget in [0, 1] pixel units, number or fraction (default: the "
                    "dataset's, as robustkit evaluate: CIFAR/Tiny-ImageNet 8/255, MNIST 0.3)")
    a("--attack", default="pgd20", help="pgdK or cwK: K steps, alpha = eps/4, random start, "
                                        "last iterate, no early stop (default pgd20)")
    a("--layers", default="auto", help="auto (every conv and linear module, default) or comma-"
                                       "separated module names or unique ends of them, e.g. "
                                       "model.layer3,layer4")
    a("--reduction", choices=("elementwise", "spatial_mean"), default="elementwise",
      help="sigma convention: elementwise (paper, default) or spatial_mean (MindArmour)")
    a("--n-examples", metavar="N", default="1000", help="first N test images (default 1000)")
    a("--source-model", metavar="M", help="make x' once on M (a --model label or spec, or "
                                          "another model spec) and measure every model on it")
    a("--source-checkpoint", metavar="PATH",
      help="weights of a --source-model that is not one of the --model entries")
    a("--ratio", default="0.1", help="top-k ratio rho: k = ceil(rho * channels) (default 0.1)")
    a("--draws", default="5", help="random k-neuron sets in the intervention test (default 5)")
    a("--batch-size", metavar="B", default="256", help="images per forward/attack batch "
                                                       "(default 256)")
    a("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    a("--seed", default="0", help="seed of the random starts, random neurons and bootstrap "
                                  "(default 0); the same seed gives the same results")
    a("--out", metavar="DIR", required=True, help="output folder (created)")
    a("--save-adv", action="store_true", help="also write the adversarial images to DIR/adv.pt")
    a("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run, entries=None)


# ------------------------------------------------------------------------------ the command
def run(args) -> int:
    from robustkit.utils import check_writable, resolve_device

    entries = model_entries(args.entries)
    labels = model_labels(entries)
    info, eps = dataset_and_eps(args)
    spec = attack_spec(args.attack)
    layers = "auto" if args.layers.strip() == "auto" else [
        s.strip() for s in args.layers.split(",") if s.strip()]
    if not layers:
        raise CLIError(f"--layers {args.layers!r}: give auto or module names")
    n = integer(args.n_examples, "--n-examples", 2)  # a bootstrap needs two images
    try:
        ratio = float(args.ratio)
    except ValueError:
        raise CLIError(f"--ratio {args.ratio!r}: expected a number in (0, 1]") from None
    if not 0 < ratio <= 1:
        raise CLIError(f"--ratio {args.ratio!r}: must lie in (0, 1]")
    draws = integer(args.draws, "--draws", 1)
    batch_size = integer(args.batch_size, "--batch-size", 1)
    seed = integer(args.seed, "--seed", 0)
    if args.source_checkpoint is not None:
        if args.source_model is None:
            raise CLIError("--source-checkpoint needs --source-model")
        if not Path(args.source_checkpoint).is_file():
            raise CLIError(f"--source-checkpoint {args.source_checkpoint!r}: file not found")
    with user_input(ConfigError, "--device", (ValueError, RuntimeError)):
        device = resolve_device(args.device)
    out = check_writable(Path(args.out), "--out")  # before any model or data is loaded

    from tqdm.contrib.logging import logging_redirect_tqdm

    from robustkit.cli.progress import tqdm_factory
    from robustkit.evaluation.results import format_eps
    from robustkit.sensitivity import common_layers, compare
    from robustkit.utils import seed_everything

    x, y, _ = load_images(args.dataset, args.data_root, n)
    seed_everything(seed)  # a FILE.py:FN factory that does not seed still builds the same model
    models = {lb: load_model_arg(e["spec"], e["checkpoint"], info, args.dataset, device)
              for lb, e in zip(labels, entries, strict=True)}
    with user_input(ConfigError, "--layers"):
        common_layers(models, layers)  # a bad name is one line naming the flag, before any work
    source, source_model = _source(args, entries, labels, info, device)
    logger.info("neuron sensitivity of %s on the first %d %s test images; %s, Linf eps=%s, %s",
                ", ".join(labels), n, args.dataset, spec.name, format_eps(eps),
                f"x' transferred from {source}" if source else "white-box on each model")
    with logging_redirect_tqdm():
        report = compare(
            models, x, y, attack=spec.name, eps=eps, source=source, source_model=source_model,
            layers=layers, reduction=args.reduction, ratio=ratio, draws=draws,
            batch_size=batch_size, seed=seed,
            model_info={lb: {"model": e["spec"], "checkpoint": e["checkpoint"]}
                        for lb, e in zip(labels, entries, strict=True)},
            about={"dataset": args.dataset, "split": "test", "device": str(device)},
            progress=tqdm_factory(False if args.no_progress else None))
    path = report.save(out, save_adv=args.save_adv)
    print(report.table())
    figures = ", ".join(str(out / f) for f in report.to_dict()["figures"])
    print(f"results: {path}\nfigures: {figures}\nTensorBoard: tensorboard --logdir {out / 'tb'}")
    return 0


def _source(args, entries, labels, info, device):
    """``(label, model)`` of ``--source-model``: ``(label, None)`` for a measured ``--model``,
    ``(None, None)`` without the flag (white-box on each model)."""
    from robustkit.cli.evaluate import _default_name

    name = args.source_model
    if name is None:
        return None, None
    hits = [i for i, lb in enumerate(labels) if lb == name] or [
        i for i, m in enumerate(entries) if m["spec"] == name]
    if len(hits) > 1:
        raise CLIError(f"--source-model {name!r} matches {len(hits)} models; use one of the "
                       f"labels {', '.join(labels)}")
    if hits:
        if args.source_checkpoint is not None:
            raise CLIError(f"--source-model {name!r} is a measured --model (with its own "
                           "weights); --source-checkpoint applies only to another model")
        return labels[hits[0]], None
    return _default_name(name), load_model_arg(name, args.source_checkpoint, info, args.dataset,
                                               device)
