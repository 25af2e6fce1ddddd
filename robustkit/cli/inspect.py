"""``robustkit inspect``: saliency of robust and standard models side by side (methods.md §8.1,
issue #13 §3).

Wiring only: the flags become models (as ``robustkit sensitivity`` reads them, with its helpers)
and the first N test images; ``--target``, ``--subset`` and ``--correction`` go to
``robustkit.saliency.compare`` as they are, which makes each model's white-box x' (PGD, last
iterate, α = ε/4), explains x, x' and the shared x + δ, scores the maps and runs the statistics;
the CLI prints ``report.table()`` and ``report.save(out)`` writes the grids, ``metrics.csv``,
``summary.json``, ``index.html``, ``metrics_long.html`` and ``tb/``: exactly what
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

protocol (methods.md section 8.1): the first N test images (or --subset correct-by-all); the
  maps explain --target; x' = PGD against the label (--attack pgdK or cwK, L-inf, alpha = eps/4,
  random start, last iterate) white-box on each model; each model is explained on x, its own x'
  and x + delta (random signs of size eps, the same for every model: a shared control).
  kind: from the model card for robustkit:NAME models, else robust at adv. accuracy >= 0.2.

metrics per image (CSV rows index,model,explainer,input,metric,value):
  input clean / adv: sparseness complexity total_variation hfer alignment_cos edge_spearman
  input pair (map of x vs map of x'), noise (vs map of x + delta): stability_spearman
    topk_intersection stability_cos; pair also split by flipped / unchanged predictions
  datasets with object boxes (tinyimagenet), clean / adv: mass_in_box pointing_game (the
    mean box area fraction, their chance level, is summary.json's "box_chance")
  --faithfulness, clean: deletion_auc insertion_auc (32 steps, black baseline)
  gradient and adaptgrad both selected: adaptgrad_residual (explainer adaptgrad, clean / adv)
  Means with 95% BCa CIs; paired differences b - a (a = the first model) with d_z [CI],
  Wilcoxon p and p_adjusted (--correction over every paired test; m printed); explainers
  compared by the paired CI of their |d_z| gap. Details: docs/guide/saliency.md

output (--out DIR):
  summary.json  "models", "metrics", "pairs", "stability_by_prediction",
                "explainer_differences", "directions", "settings" (docs/guide/saliency.md)
  metrics.csv   per-image values
  grid_EXPLAINER.png  the first --grid-rows images: the image, per model the maps of x, x'
  index.html    the wide table (metric x explainer: means, d_z [CI], p, direction), grids;
                metrics_long.html: the long format (self-contained in DIR)
  tb/           TensorBoard images of the grids (tensorboard --logdir DIR/tb)

example:
  robustkit inspect --dataset sample-mnist --model robustkit:mnist_smallcnn_standard \\
      --model robustkit:mnist_smallcnn_robust --out runs/inspect
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="saliency maps of robust and standard models on clean and adversarial "
                        "images (grids, metrics, paired tests, index.html)",
        description="Explain each model's logit of its predicted (or the true) class on the "
                    "first N test images and on "
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
    a("--target", choices=("predicted", "true"), default="predicted",
      help="class the maps explain: each model's prediction on x (default) or the true label")
    a("--subset", choices=("all", "correct-by-all"), default="all",
      help="all images (default) or only those every model classifies correctly")
    a("--correction", choices=("holm", "bh", "none"), default="holm",
      help="multiple-comparison correction over every paired test (default holm)")
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
              faithfulness_steps=FAITHFULNESS_STEPS if args.faithfulness else None,
              target=args.target, subset=args.subset, correction=args.correction)
    out, device, x, y, boxes, models = load(args, c)
    kinds = {lb: k for lb, e in zip(c.labels, c.entries, strict=True)
             if (k := card_kind(e["spec"])) is not None}
    logger.info("saliency of %s on the first %d %s test images (subset %s, target %s); %s "
                "white-box, Linf eps=%s; explainers %s", ", ".join(c.labels), c.n, args.dataset,
                args.subset, args.target, c.attack, format_eps(c.eps), ", ".join(names))
    with logging_redirect_tqdm():
        report = compare(models, x, y, explainers=names, attack=c.attack, eps=c.eps,
                         boxes=boxes, kinds=kinds, kind_source="model card",
                         model_info=c.model_info, about=c.about, batch_size=c.batch_size,
                         seed=c.seed, progress=tqdm_factory(False if args.no_progress else None),
                         **kw)
    path = report.save(out, tensorboard=not args.no_tensorboard)
    print(report.table())
    print(f"results: {path}\nper-image values: {out / 'metrics.csv'}\n"
          f"page: {out / 'index.html'} (long format: {out / 'metrics_long.html'})")
    return 0
