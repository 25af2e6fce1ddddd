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

from robustkit.cli import MODEL_FORMS, CLIError
from robustkit.cli.compare import add_flags, integer, load, parse

logger = logging.getLogger(__name__)

# The explainers this command offers (keys of robustkit.saliency.EXPLAINERS).
CHOICES = ("gradient", "gradient_x_input", "smoothgrad", "adaptgrad", "ig", "ig-adaptgrad")
DEFAULT_EXPLAINERS = "gradient,smoothgrad,adaptgrad"
# --faithfulness: deletion and insertion AUC with this many steps (methods.md §8.2 item 7)
FAITHFULNESS_STEPS = 32

EPILOG = MODEL_FORMS + """\
  Repeat --model to compare models; --checkpoint and --name apply to the --model just before
  them. The first model is the reference of the paired tests.

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
    add_flags(p, "explain; the first is the reference", n="16", batch="64", attack="")
    a = p.add_argument
    a("--explainers", default=DEFAULT_EXPLAINERS,
      help=f"comma-separated, of {', '.join(CHOICES)} (default {DEFAULT_EXPLAINERS})")
    a("--n-samples", metavar="S", default="16",
      help="noise samples of smoothgrad/adaptgrad/ig-adaptgrad (default 16)")
    a("--ig-steps", metavar="K", default="32", help="integration steps of ig/ig-adaptgrad "
                                                    "(default 32)")
    a("--faithfulness", action="store_true",
      help="also score the clean maps by deletion and insertion AUC (RISE; 32 steps, black "
           "baseline: 66 forward passes per image, model and explainer)")
    a("--grid-rows", metavar="R", default="16",
      help="images shown in each PNG grid: the first R (default 16); the metrics cover all N")
    a("--no-tensorboard", action="store_true", help="skip DIR/tb")
    p.set_defaults(run=run)


def run(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from robustkit.cli.progress import tqdm_factory
    from robustkit.evaluation.api import card_kind
    from robustkit.evaluation.results import format_eps
    from robustkit.saliency import compare

    c = parse(args, n_min=2)  # a bootstrap needs two images
    names = list(dict.fromkeys(s.strip() for s in args.explainers.split(",") if s.strip()))
    bad = [e for e in names if e not in CHOICES]
    if not names or bad:
        raise CLIError(f"--explainers: unknown explainer {bad[0]!r}; valid: {', '.join(CHOICES)}"
                       if bad else f"--explainers {args.explainers!r}: give one or more of "
                       f"{', '.join(CHOICES)}")
    kw = dict(n_samples=integer(args.n_samples, "--n-samples", 1),
              ig_steps=integer(args.ig_steps, "--ig-steps", 1),
              grid_rows=integer(args.grid_rows, "--grid-rows", 1),
              faithfulness_steps=FAITHFULNESS_STEPS if args.faithfulness else None)
    out, device, x, y, boxes, models = load(args, c)
    kinds = {lb: k for lb, e in zip(c.labels, c.entries, strict=True)
             if (k := card_kind(e["spec"])) is not None}
    logger.info("saliency of %s on the first %d %s test images; %s white-box, Linf eps=%s; "
                "explainers %s", ", ".join(c.labels), c.n, args.dataset, c.attack,
                format_eps(c.eps), ", ".join(names))
    with logging_redirect_tqdm():
        report = compare(models, x, y, explainers=names, attack=c.attack, eps=c.eps,
                         boxes=boxes, kinds=kinds, kind_source="model card",
                         model_info=c.model_info, about=c.about, batch_size=c.batch_size,
                         seed=c.seed, progress=tqdm_factory(False if args.no_progress else None),
                         **kw)
    path = report.save(out, tensorboard=not args.no_tensorboard)
    print(report.table())
    print(f"results: {path}\nper-image values: {out / 'metrics.csv'}\n"
          f"page: {out / 'index.html'}")
    return 0
