"""``robustkit inspect``: saliency of robust and standard models side by side (methods.md §8.1,
issue #13 §3).

Wiring only: the flags become models (as ``robustkit sensitivity`` reads them, with its helpers),
the first N test images and, per model, x' by its white-box PGD (last iterate, α = ε/4); the
explainers (``robustkit.saliency``) explain the true label on x and x', ``saliency.metrics``
scores each map, ``reports.stats`` gives the bootstrap CIs and Wilcoxon p-values and
``reports.inspect`` draws the grids and ``index.html``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from robustkit.cli import CLIError, user_input
from robustkit.cli.compare import (
    PerModel,
    attack_all,
    attack_kwargs,
    attack_spec,
    dataset_and_eps,
    integer,
    load_model_arg,
    model_entries,
    model_labels,
)
from robustkit.errors import ConfigError, DataError
from robustkit.reports.stats import CONFIDENCE, N_RESAMPLES, bootstrap_ci, wilcoxon_p

logger = logging.getLogger(__name__)

# The explainers this command offers (keys of robustkit.saliency.EXPLAINERS).
CHOICES = ("gradient", "gradient_x_input", "smoothgrad", "adaptgrad", "ig", "ig-adaptgrad")
DEFAULT_EXPLAINERS = "gradient,smoothgrad,adaptgrad"
# Metrics (methods.md §8.2), listed in EPILOG: of one map (items 1-4), with boxes (item 5), of
# the pair (map of x, map of x') (item 6), with --faithfulness (item 7, on x).
FAITHFULNESS_STEPS = 32
INPUTS = ("clean", "adv", "pair")
# Without a model card, a model is called robust when it keeps this much accuracy under the
# attack: standard models fall to ~0 under PGD at the usual budgets, adversarially trained ones
# keep 40-95 % (methods.md §7 tables); 0.2 sits well between the two.
ROBUST_THRESHOLD = 0.2
CSV_NAME = "metrics.csv"

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


def run(args) -> int:
    from robustkit.utils import check_writable, resolve_device

    entries = model_entries(args.entries)
    labels = model_labels(entries)
    info, eps = dataset_and_eps(args)
    spec = attack_spec(args.attack)
    explainers = _explainers(args.explainers)
    n = integer(args.n_examples, "--n-examples", 2)  # a bootstrap needs two images
    settings = {"dataset": args.dataset, "split": "test", "n": n, "eps": eps, "norm": "Linf",
                "explainers": explainers, "target": "true label",
                "n_samples": integer(args.n_samples, "--n-samples", 1),
                "ig_steps": integer(args.ig_steps, "--ig-steps", 1),
                "batch_size": integer(args.batch_size, "--batch-size", 1),
                "grid_rows": integer(args.grid_rows, "--grid-rows", 1),
                "seed": integer(args.seed, "--seed", 0), "reference": labels[0],
                "faithfulness_steps": FAITHFULNESS_STEPS if args.faithfulness else None}
    with user_input(ConfigError, "--device", (ValueError, RuntimeError)):
        device = resolve_device(args.device)
    settings["device"] = str(device)
    out = check_writable(Path(args.out), "--out")  # before any model or data is loaded
    return _run(args, entries, labels, spec, settings, out, device)


def _explainer_kwargs(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if name in ("smoothgrad", "adaptgrad", "ig-adaptgrad"):
        kw.update(n_samples=settings["n_samples"], seed=settings["seed"])
    if name in ("ig", "ig-adaptgrad"):
        kw["n_steps"] = settings["ig_steps"]
    return kw


def _kind(spec: str, adv_accuracy: float) -> tuple[str | None, str]:
    """``(kind, source)``: from the shipped model's card when there is one, else the threshold."""
    if spec.startswith("robustkit:"):
        from robustkit.models import model_card

        try:
            objective = model_card(spec.partition(":")[2])["objective"]["name"]
        except (KeyError, TypeError, ValueError):  # no card, or one without an objective
            objective = None
        if objective:
            return ("standard" if objective == "natural" else "robust"), "model card"
    return ("robust" if adv_accuracy >= ROBUST_THRESHOLD else "standard",
            f"adv_accuracy >= {ROBUST_THRESHOLD}")


def _run(args, entries, labels, spec, settings, out: Path, device) -> int:
    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    from robustkit.cli.progress import tqdm_factory
    from robustkit.data import DATASETS, first_n, load_dataset
    from robustkit.evaluation.results import format_eps
    from robustkit.utils import seed_everything

    info = DATASETS[settings["dataset"]]
    n, eps, seed, bs = settings["n"], settings["eps"], settings["seed"], settings["batch_size"]
    with user_input(DataError, f"--dataset {settings['dataset']}"):
        test = load_dataset(settings["dataset"], "test", args.data_root)
    if n > len(test):
        raise CLIError(f"--n-examples {n} exceeds the {len(test)} test images of "
                       f"{settings['dataset']} found")
    data = first_n(test, n)
    x = torch.stack([data[i][0] for i in range(n)])
    y = torch.stack([torch.as_tensor(data[i][1]) for i in range(n)]).long()
    boxes = getattr(data, "boxes", None)

    seed_everything(seed)
    models = {lb: load_model_arg(e["spec"], e["checkpoint"], info, settings["dataset"], device)
              for lb, e in zip(labels, entries, strict=True)}
    settings.update(eps_text=format_eps(eps), attack=spec.name,
                    attack_settings={"name": spec.name, "class": "PGD", "family": spec.kind,
                                     **attack_kwargs(spec, eps), "generator_seed": seed},
                    ci={"over": "images", "method": "BCa", "confidence_level": CONFIDENCE,
                        "n_resamples": N_RESAMPLES, "seed": seed},
                    robust_threshold=ROBUST_THRESHOLD)
    logger.info("saliency of %s on the first %d %s test images; %s white-box, Linf eps=%s; "
                "explainers %s", ", ".join(labels), n, settings["dataset"], spec.name,
                settings["eps_text"], ", ".join(settings["explainers"]))
    progress = tqdm_factory(False if args.no_progress else None)
    summary: dict[str, Any] = {"n": n, "models": {}}
    if boxes is not None:
        from robustkit.saliency.metrics import box_area_fraction

        summary["box_chance"] = float(box_area_fraction(boxes, *x.shape[-2:]).mean())
    rows: list[tuple[int, str, str, str, str, float]] = []
    maps: dict[str, dict[str, dict[str, Any]]] = {e: {} for e in settings["explainers"]}
    captions: dict[str, dict[str, list[str]]] = {}
    with logging_redirect_tqdm():
        for i, lb in enumerate(labels):
            model = models[lb]
            where = f"[{i + 1}/{len(labels)}] {lb}"
            x_adv = attack_all(spec, model, x, y, eps, seed, bs, device,
                                progress(f"{where} attack", n))
            inputs = {"clean": x, "adv": x_adv}
            captions[lb] = {}
            acc = {}
            for key, xi in inputs.items():
                pred, conf = _predict(model, xi, bs, device)
                acc[key] = float((pred == y).float().mean())
                captions[lb][key] = [f"{'x' if key == 'clean' else 'x′'}: {int(p)} "
                                     f"({100 * float(c):.0f}%){'' if p == t else ' ✗'}"
                                     for p, c, t in zip(pred, conf, y, strict=True)]
            kind, source = _kind(entries[i]["spec"], acc["adv"])
            summary["models"][lb] = {"model": entries[i]["spec"],
                                     "checkpoint": entries[i]["checkpoint"],
                                     "clean_accuracy": acc["clean"], "adv_accuracy": acc["adv"],
                                     "kind": kind, "kind_source": source}
            bar = progress(f"{where} explain", 2 * n * len(settings["explainers"]))
            raw = {}
            with bar:
                for name in settings["explainers"]:
                    maps[name][lb], raw[name] = _explain_and_score(
                        name, model, inputs, y, boxes, settings, device, lb, rows, bar)
            if "gradient" in raw and "adaptgrad" in raw:
                from robustkit.saliency.metrics import adaptgrad_residual

                for key in ("clean", "adv"):
                    _append(rows, lb, "adaptgrad", key, {"adaptgrad_residual": adaptgrad_residual(
                        raw["gradient"][key], raw["adaptgrad"][key])})
    summary["metrics"], summary["pairs"] = _statistics(rows, labels, settings)
    summary["settings"] = settings
    return _write(summary, rows, x, maps, captions, y, out, not args.no_tensorboard)


def _predict(model, x, bs: int, device):
    import torch

    from robustkit.utils import eval_mode

    preds, confs = [], []
    with torch.no_grad(), eval_mode(model):
        for j in range(0, x.shape[0], bs):
            p = model(x[j:j + bs].to(device)).float().softmax(1).cpu()
            c, k = p.max(1)
            preds.append(k)
            confs.append(c)
    return torch.cat(preds), torch.cat(confs)


def _explain_and_score(name, model, inputs, y, boxes, settings, device, label, rows, bar):
    """Both maps of one model and explainer, display-scaled (for the grid) and raw; appends the
    CSV rows of every metric to ``rows``."""
    import torch

    from robustkit.saliency import create_explainer, percentile_scale, signed_map
    from robustkit.saliency import metrics as M

    bs = settings["batch_size"]
    with user_input(ConfigError, f"--explainers {name}"):
        explainer = create_explainer(name, model, **_explainer_kwargs(name, settings))
    raw: dict[str, Any] = {}
    for key, xi in inputs.items():
        parts = []
        for j in range(0, xi.shape[0], bs):
            xb = xi[j:j + bs].to(device)
            parts.append(explainer.attribute(xb, target=y[j:j + bs].to(device)).cpu())
            bar.update(xb.shape[0])
        raw[key] = torch.cat(parts)
        a, xc = raw[key].double(), xi.double()
        values = {"sparseness": M.sparseness(a), "complexity": M.complexity(a),
                  "total_variation": M.total_variation(a), "hfer": M.hfer(a),
                  "alignment_cos": M.alignment_cos(a, xc), "edge_spearman": M.edge_spearman(a, xc)}
        if boxes is not None:
            values.update(mass_in_box=M.mass_in_box(a, boxes),
                          pointing_game=M.pointing_game(a, boxes))
        if key == "clean" and settings["faithfulness_steps"]:
            values.update(_faithfulness(model, xi, raw[key], y, settings, device))
        _append(rows, label, name, key, values)
    a, b = raw["clean"].double(), raw["adv"].double()
    _append(rows, label, name, "pair", {"stability_spearman": M.stability_spearman(a, b),
                                        "topk_intersection": M.topk_intersection(a, b),
                                        "stability_cos": M.stability_cos(a, b)})
    return {key: percentile_scale(signed_map(r.float())) for key, r in raw.items()}, raw


def _faithfulness(model, x, a, y, settings, device) -> dict[str, Any]:
    """Deletion and insertion AUC of the true label, batch by batch on ``device``."""
    import torch

    from robustkit.saliency import metrics as M

    bs, steps = settings["batch_size"], settings["faithfulness_steps"]
    out: dict[str, list] = {"deletion_auc": [], "insertion_auc": []}
    for j in range(0, x.shape[0], bs):
        xb, ab, yb = (t[j:j + bs].to(device) for t in (x, a, y))
        out["deletion_auc"].append(M.deletion_auc(model, xb, ab, yb, steps=steps).cpu())
        out["insertion_auc"].append(M.insertion_auc(model, xb, ab, yb, steps=steps).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _append(rows, label: str, explainer: str, key: str, values: dict[str, Any]) -> None:
    for metric, v in values.items():
        for idx, val in enumerate(v.tolist()):
            rows.append((idx, label, explainer, key, metric, float(val)))


def _statistics(rows, labels: list[str], settings: dict[str, Any]):
    """Per (explainer, metric, input, model) mean and CI; per pair (reference, other) the mean
    paired difference b − a, its CI and the Wilcoxon p. NaN values (a constant map's Spearman ρ)
    are left out: of the mean, and of the pair for both models."""
    import numpy as np

    seed, n = settings["seed"], settings["n"]
    table: dict[tuple[str, str, str, str], np.ndarray] = {}
    for idx, lb, ex, key, metric, val in rows:
        table.setdefault((ex, metric, key, lb), np.full(n, np.nan))[idx] = val
    metrics, pairs = [], []
    for ex, key, metric in metric_order(rows, settings["explainers"]):
        for lb in labels:
            v = table[(ex, metric, key, lb)]
            v = v[np.isfinite(v)]
            metrics.append({"explainer": ex, "metric": metric, "input": key,
                            "model": lb, "n": int(v.size),
                            "mean": float(v.mean()) if v.size else None,
                            "ci95": list(bootstrap_ci(v, seed)) if v.size > 1 else None})
        a_all = table[(ex, metric, key, labels[0])]
        for other in labels[1:]:
            b_all = table[(ex, metric, key, other)]
            ok = np.isfinite(a_all) & np.isfinite(b_all)
            a, b = a_all[ok], b_all[ok]
            d = b - a
            sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
            pairs.append({"explainer": ex, "metric": metric, "input": key,
                          "a": labels[0], "b": other, "n": int(d.size),
                          "diff_mean": float(d.mean()) if d.size else None,
                          "ci95": list(bootstrap_ci(d, seed)) if d.size > 1 else None,
                          # paired effect size (Cohen's d_z): comparable across metrics and
                          # explainers, whose scales differ
                          "d_z": float(d.mean()) / sd if sd > 0 else None,
                          "wilcoxon_p": wilcoxon_p(b, a)})
    return metrics, pairs


def metric_order(rows, explainers: list[str]) -> list[tuple[str, str, str]]:
    """The ``(explainer, input, metric)`` triples present in ``rows``: explainers as given, then
    clean, adv, pair, then metrics in the order they were computed."""
    seen = dict.fromkeys((ex, key, metric) for _, _, ex, key, metric, _ in rows)
    return sorted(seen, key=lambda t: (explainers.index(t[0]), INPUTS.index(t[1])))


def _write(summary, rows, x, maps, captions, y, out: Path, tensorboard: bool) -> int:
    import csv
    import io

    from robustkit.reports.inspect import (
        grid_figure,
        grid_filename,
        save_png,
        write_html,
        write_tensorboard,
    )
    from robustkit.utils import atomic_write, atomic_write_json, output_errors

    s = summary["settings"]
    figures, grids = {}, {}
    r = min(s["grid_rows"], s["n"])  # the grids show the first r images; metrics cover all n
    shown = f"first {s['n']}" if r == s["n"] else f"first {r} of the {s['n']}"
    for ex in s["explainers"]:
        figures[ex] = grid_figure(
            x[:r].numpy(), {lb: {k: m[:r] for k, m in v.items()} for lb, v in maps[ex].items()},
            {lb: {k: c[:r] for k, c in v.items()} for lb, v in captions.items()},
            f"{ex}: maps of the true label's logit on x and on x' ({s['attack']} white-box, "
            f"L∞ ε = {s['eps_text']}); {shown} {s['dataset']} test images",
            row_labels=[f"#{i}  y = {int(t)}" for i, t in enumerate(y[:r])])
        grids[ex] = save_png(figures[ex], out / grid_filename(ex)).name
    summary["grids"] = grids
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "model", "explainer", "input", "metric", "value"])
    w.writerows([idx, lb, ex, key, metric, repr(val)] for idx, lb, ex, key, metric, val in rows)
    with output_errors(out / CSV_NAME):
        atomic_write(out / CSV_NAME, buf.getvalue().encode())
    if tensorboard:
        summary["tensorboard"] = "tb"
        write_tensorboard(figures, out / "tb")
    path = out / "summary.json"
    with output_errors(path):
        atomic_write_json(path, summary)
    page = write_html(summary, grids, out / "index.html", CSV_NAME)
    _print_table(summary)
    print(f"results: {path}\nper-image values: {out / CSV_NAME}\npage: {page}")
    logger.info("wrote %s", path)
    return 0


def _fmt(v, ci) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")


def _print_table(summary: dict[str, Any]) -> None:
    s = summary["settings"]
    print(f"\nsaliency on the first {s['n']} {s['dataset']} test images: {s['attack']} "
          f"white-box, Linf eps = {s['eps_text']}, target = true label")
    labels = list(summary["models"])
    width = max(len("model"), *(len(lb) for lb in labels)) + 2
    print(f"  {'model':<{width}}{'clean':>9}{'adversarial':>13}  kind")
    for lb, m in summary["models"].items():
        print(f"  {lb:<{width}}{100 * m['clean_accuracy']:>8.2f}%{100 * m['adv_accuracy']:>12.2f}%"
              f"  {m['kind']} ({m['kind_source']})")
    means = {(r["explainer"], r["metric"], r["input"], r["model"]): r
             for r in summary["metrics"]}
    cw = 30
    head = "".join(f"{lb[:cw - 2]:<{cw}}" for lb in labels)
    pair_heads = "".join(f"{(b + ' - ' + labels[0])[:cw - 2]:<{cw}}{'d_z':>7}{'p':>8}  "
                         for b in labels[1:])
    print(f"\n  {'explainer':<14}{'metric':<20}{'input':<7}{head}{pair_heads}")
    for ex, metric, key in dict.fromkeys((r["explainer"], r["metric"], r["input"])
                                         for r in summary["metrics"]):
        rs = [means[(ex, metric, key, lb)] for lb in labels]
        cells = "".join(f"{_fmt(r['mean'], r['ci95']):<{cw}}" for r in rs)
        diffs = ""
        for p in summary["pairs"]:
            if (p["explainer"], p["metric"], p["input"]) == (ex, metric, key):
                pv = "-" if p["wilcoxon_p"] is None else f"{p['wilcoxon_p']:.3g}"
                dz = "-" if p.get("d_z") is None else f"{p['d_z']:.2f}"
                diffs += f"{_fmt(p['diff_mean'], p['ci95']):<{cw}}{dz:>7}{pv:>8}  "
        print(f"  {ex:<14}{metric:<20}{key:<7}{cells}{diffs}")
