"""``robustkit inspect``: saliency of robust and standard models side by side (methods.md §8.1,
issue #13 §3).

Wiring only: the flags become models (as ``robustkit sensitivity`` reads them, with its helpers)
and the first N test images; ``robustkit.saliency.compare`` makes each model's white-box x'
(PGD, last iterate, α = ε/4), explains the true label on x and x', scores the maps and runs the
statistics; the CLI prints ``report.table()`` and ``report.save(out)`` writes the grids,
``metrics.csv``, ``summary.json``, ``index.html`` and ``tb/``: exactly what
``compare(...).save(out)`` writes in Python.
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

# The explainers this command offers (keys of robustkit.saliency.EXPLAINERS).
CHOICES = ("gradient", "gradient_x_input", "smoothgrad", "adaptgrad", "ig", "ig-adaptgrad")
DEFAULT_EXPLAINERS = "gradient,smoothgrad,adaptgrad"
# --faithfulness: deletion and insertion AUC with this many steps (methods.md §8.2 item 7)
FAITHFULNESS_STEPS = 32

EPILOG = """\
model forms (as in robustkit sensitivity; repeat --model to compare models):
  NAME | FILE.py:FN | robustbench:NAME | robustkit:NAME, each optionally followed by
  --checkpoint PATH and --name LABEL. The first model is the reference of the paired tests.

protocol (methods.md section 8.1): the first N test images; target = the true label; x' = PGD
  (--attack pgdK or cwK, L-inf, alpha = eps/4, random start, last iterate) white-box on each
  model; each explainer explains each model on x and on its own x'.
  kind: "robust"/"standard" from the model card (objective "natural" = standard) for
  robustkit:NAME models, else robust when adversarial accuracy >= 0.2.

metrics per image (CSV rows index,model,explainer,input,metric,value):
  input clean / adv: sparseness complexity total_variation hfer alignment_cos edge_spearman
  input pair (map of x vs map of x'): stability_spearman topk_intersection stability_cos
  datasets with object boxes (tinyimagenet), clean / adv: mass_in_box pointing_game (the
    mean box area fraction, their chance level, is summary.json's "box_chance")
  --faithfulness, clean: deletion_auc insertion_auc (32 steps, black baseline)
  gradient and adaptgrad both selected: adaptgrad_residual (explainer adaptgrad, clean / adv)
  Means and 95% BCa bootstrap CIs over the images with a finite value; paired differences
  (b - a, a = the first model) over the images finite for both, their effect size
  d_z = mean / standard deviation (comparable across metrics and explainers), Wilcoxon
  signed-rank p (null when every difference is zero).

output (--out DIR):
  summary.json  {"n", "models": {LABEL: {"clean_accuracy", "adv_accuracy", "kind", ...}},
                 "metrics": [{"explainer", "metric", "input", "model", "n", "mean", "ci95"}],
                 "pairs": [{"explainer", "metric", "input", "a", "b", "n", "diff_mean", "ci95",
                 "d_z", "wilcoxon_p"}], "grids": {EXPLAINER: FILE}, "settings": {...}}
  metrics.csv   per-image values
  grid_EXPLAINER.png  rows = the first --grid-rows images; columns = the image, then per model
                      the map of x and of x'
  index.html    grids and tables (self-contained in DIR)
  tb/           TensorBoard images of the grids (tensorboard --logdir DIR/tb)

example:
  robustkit inspect --dataset sample-mnist --model robustkit:mnist_smallcnn_standard \\
      --model robustkit:mnist_smallcnn_robust --out runs/inspect
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="saliency maps of robust and standard models on clean and adversarial "
                        "images (grids, metrics, paired tests, index.html)",
        description="Explain each model's true-label logit on the first N test images and on "
                    "their white-box PGD counterparts, score the maps, compare the models "
                    "image by image and write figures, tables and a self-contained HTML page.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", action=PerModel, metavar="SPEC",
      help="model to explain (repeatable): NAME | FILE.py:FN | robustbench:NAME | "
           "robustkit:NAME; the first is the reference")
    a("--checkpoint", action=PerModel, metavar="PATH",
      help="weights of the --model just before it (loaded weights-only, strictly)")
    a("--name", action=PerModel, metavar="LABEL",
      help="label of the --model just before it (default: as robustkit evaluate names it)")
    a("--dataset", help="mnist, cifar10, cifar100, tinyimagenet, sample-mnist, sample-cifar10")
    a("--data-root", metavar="DIR", help="data folder (default $ROBUSTKIT_DATA, else ./data)")
    a("--n-examples", metavar="N", default="16", help="first N test images (default 16)")
    a("--explainers", default=DEFAULT_EXPLAINERS,
      help=f"comma-separated, of {', '.join(CHOICES)} (default {DEFAULT_EXPLAINERS})")
    a("--attack", default="pgd20", help="pgdK or cwK: K steps, alpha = eps/4, random start, "
                                        "last iterate (default pgd20)")
    a("--eps", help="L-inf budget in [0, 1] pixel units, number or fraction (default: the "
                    "dataset's: CIFAR/Tiny-ImageNet 8/255, MNIST 0.3)")
    a("--n-samples", metavar="S", default="16",
      help="noise samples of smoothgrad/adaptgrad/ig-adaptgrad (default 16)")
    a("--ig-steps", metavar="K", default="32", help="integration steps of ig/ig-adaptgrad "
                                                    "(default 32)")
    a("--batch-size", metavar="B", default="64", help="images per attack batch (default 64)")
    a("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    a("--seed", default="0", help="seed of the random starts, explainer noise and bootstrap "
                                  "(default 0)")
    a("--out", metavar="DIR", required=True, help="output folder (created)")
    a("--faithfulness", action="store_true",
      help="also score the clean maps by deletion and insertion AUC (RISE; 32 steps, black "
           "baseline: 66 forward passes per image, model and explainer)")
    a("--grid-rows", metavar="R", default="16",
      help="images shown in each PNG grid: the first R (default 16); the metrics cover all N")
    a("--no-tensorboard", action="store_true", help="skip DIR/tb")
    a("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run, entries=None)


def _explainers(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise CLIError(f"--explainers {text!r}: give one or more of {', '.join(CHOICES)}")
    for name in names:
        if name not in CHOICES:
            raise CLIError(f"--explainers: unknown explainer {name!r}; valid: "
                           f"{', '.join(CHOICES)}")
    return list(dict.fromkeys(names))


def _card_kind(spec: str) -> str | None:
    """``"robust"``/``"standard"`` from a shipped model's card (objective ``natural`` =
    standard), else ``None`` (the library then decides by adversarial accuracy)."""
    if not spec.startswith("robustkit:"):
        return None
    from robustkit.models import model_card

    try:
        objective = model_card(spec.partition(":")[2])["objective"]["name"]
    except (KeyError, TypeError, ValueError):  # no card, or one without an objective
        return None
    return ("standard" if objective == "natural" else "robust") if objective else None


def run(args) -> int:
    from robustkit.utils import check_writable, resolve_device

    entries = model_entries(args.entries)
    labels = model_labels(entries)
    info, eps = dataset_and_eps(args)
    spec = attack_spec(args.attack)
    explainers = _explainers(args.explainers)
    n = integer(args.n_examples, "--n-examples", 2)  # a bootstrap needs two images
    kw = dict(n_samples=integer(args.n_samples, "--n-samples", 1),
              ig_steps=integer(args.ig_steps, "--ig-steps", 1),
              batch_size=integer(args.batch_size, "--batch-size", 1),
              grid_rows=integer(args.grid_rows, "--grid-rows", 1),
              seed=integer(args.seed, "--seed", 0),
              faithfulness_steps=FAITHFULNESS_STEPS if args.faithfulness else None)
    with user_input(ConfigError, "--device", (ValueError, RuntimeError)):
        device = resolve_device(args.device)
    out = check_writable(Path(args.out), "--out")  # before any model or data is loaded

    from tqdm.contrib.logging import logging_redirect_tqdm

    from robustkit.cli.progress import tqdm_factory
    from robustkit.evaluation.results import format_eps
    from robustkit.saliency import compare
    from robustkit.utils import seed_everything

    x, y, boxes = load_images(args.dataset, args.data_root, n)
    seed_everything(kw["seed"])
    models = {lb: load_model_arg(e["spec"], e["checkpoint"], info, args.dataset, device)
              for lb, e in zip(labels, entries, strict=True)}
    kinds = {lb: k for lb, e in zip(labels, entries, strict=True)
             if (k := _card_kind(e["spec"])) is not None}
    logger.info("saliency of %s on the first %d %s test images; %s white-box, Linf eps=%s; "
                "explainers %s", ", ".join(labels), n, args.dataset, spec.name, format_eps(eps),
                ", ".join(explainers))
    with logging_redirect_tqdm():
        report = compare(
            models, x, y, explainers=explainers, attack=spec.name, eps=eps, boxes=boxes,
            kinds=kinds, kind_source="model card",
            model_info={lb: {"model": e["spec"], "checkpoint": e["checkpoint"]}
                        for lb, e in zip(labels, entries, strict=True)},
            about={"dataset": args.dataset, "split": "test", "device": str(device)},
            progress=tqdm_factory(False if args.no_progress else None), **kw)
    path = report.save(out, tensorboard=not args.no_tensorboard)
    print(report.table())
    print(f"results: {path}\nper-image values: {out / 'metrics.csv'}\n"
          f"page: {out / 'index.html'}")
    return 0
