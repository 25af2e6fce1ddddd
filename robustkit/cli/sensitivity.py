"""``robustkit sensitivity``: neuron sensitivity of one or more models (methods.md §4, issue #12).

Wiring only: the flags become models, one set of benign images and, per model, its adversarial
pairs; the library (``robustkit.sensitivity``) measures σ, ranks neurons and runs the intervention
test, ``scipy.stats.bootstrap`` gives the confidence intervals and ``robustkit.reports.sensitivity``
draws the figures and TensorBoard histograms. Prints a table and writes ``<out>/sensitivity.json``,
three PNG figures, ``<out>/tb/<label>/`` and, with ``--save-adv``, ``<out>/adv.pt``.

Adversarial pairs follow the paper's measurement (methods.md §4.1 [R]): PGD, L∞, α = ε/4, a
uniform random start, no early stop and the *last* iterate (full strength on every image, unlike
``robustkit evaluate``'s best-iterate, stop-on-success PGD), white-box against each model, or one
x' set made on ``--source-model`` so that every model sees identical pairs.
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
from robustkit.reports.stats import CONFIDENCE, N_RESAMPLES, bootstrap_ci

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
                                       "separated module names, e.g. model.layer3,model.layer4")
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
    settings = {"dataset": args.dataset, "split": "test", "n": n, "eps": eps, "norm": "Linf",
                "reduction": args.reduction, "ratio": ratio, "draws": draws, "seed": seed,
                "batch_size": batch_size, "layers": layers, "device": str(device)}
    return _run(args, entries, labels, spec, settings, out, device)


def _source(args, entries, labels, models, info, device):
    """``(label, model)`` of ``--source-model``, or ``None`` (white-box on each model)."""
    from robustkit.cli.evaluate import _default_name

    name = args.source_model
    if name is None:
        return None
    hits = [i for i, lb in enumerate(labels) if lb == name] or [
        i for i, m in enumerate(entries) if m["spec"] == name]
    if len(hits) > 1:
        raise CLIError(f"--source-model {name!r} matches {len(hits)} models; use one of the "
                       f"labels {', '.join(labels)}")
    if hits:
        if args.source_checkpoint is not None:
            raise CLIError(f"--source-model {name!r} is a measured --model (with its own "
                           "weights); --source-checkpoint applies only to another model")
        return labels[hits[0]], models[labels[hits[0]]]
    return _default_name(name), load_model_arg(name, args.source_checkpoint, info, args.dataset,
                                               device)


def _run(args, entries, labels, spec, settings, out: Path, device) -> int:
    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    from robustkit.cli.progress import tqdm_factory
    from robustkit.data import DATASETS, first_n, load_dataset
    from robustkit.evaluation.results import format_eps
    from robustkit.sensitivity import resolve_layers
    from robustkit.utils import seed_everything

    info = DATASETS[settings["dataset"]]
    n, eps, seed = settings["n"], settings["eps"], settings["seed"]
    with user_input(DataError, f"--dataset {settings['dataset']}"):
        test = load_dataset(settings["dataset"], "test", args.data_root)
    if n > len(test):
        raise CLIError(f"--n-examples {n} exceeds the {len(test)} test images of "
                       f"{settings['dataset']} found")
    data = first_n(test, n)
    x = torch.stack([data[i][0] for i in range(n)])
    y = torch.stack([torch.as_tensor(data[i][1]) for i in range(n)]).long()

    seed_everything(seed)  # a FILE.py:FN factory that does not seed still builds the same model
    models = {lb: load_model_arg(e["spec"], e["checkpoint"], info, settings["dataset"], device)
              for lb, e in zip(labels, entries, strict=True)}
    own: dict[str, list[str]] = {}
    for lb, model in models.items():
        with user_input(ConfigError, f"--layers (model {lb})"):
            own[lb] = resolve_layers(model, settings["layers"])
    common = [ly for ly in own[labels[0]] if all(ly in own[lb] for lb in labels)]
    skipped = {lb: [ly for ly in own[lb] if ly not in common] for lb in labels}
    if not common:
        raise CLIError("the models share no layer to compare: " + "; ".join(
            f"{lb}: {', '.join(own[lb])}" for lb in labels))
    if any(skipped.values()):
        logger.warning("the models have different layer sets; comparing only the %d common "
                       "layers (%s); skipped: %s", len(common), ", ".join(common), "; ".join(
                           f"{lb}: {', '.join(s)}" for lb, s in skipped.items() if s))
    source = _source(args, entries, labels, models, info, device)

    settings.update(eps_text=format_eps(eps), attack=spec.name,
                    attack_settings={"name": spec.name, "class": "PGD", "family": spec.kind,
                                     **attack_kwargs(spec, eps), "generator_seed": seed},
                    source_model=source[0] if source else None,
                    ci={"over": "images", "method": "BCa", "confidence_level": CONFIDENCE,
                        "n_resamples": N_RESAMPLES, "seed": seed})
    logger.info("neuron sensitivity of %s on the first %d %s test images; %s, Linf eps=%s, "
                "%s", ", ".join(labels), n, settings["dataset"], spec.name, settings["eps_text"],
                f"x' transferred from {source[0]}" if source else "white-box on each model")
    progress = tqdm_factory(False if args.no_progress else None)
    report: dict[str, Any] = {"models": {}}
    sigmas: dict[str, dict[str, Any]] = {}
    relative: dict[str, dict[str, Any]] = {}
    adv: dict[str, Any] = {}
    with logging_redirect_tqdm():
        shared = None
        if source is not None:  # one x' set for every model: made once, on the source model
            shared = attack_all(spec, source[1], x, y, eps, seed, settings["batch_size"],
                                 device, progress(f"x' on {source[0]}", n))
        for i, lb in enumerate(labels):
            model = models[lb]
            where = f"[{i + 1}/{len(labels)}] {lb}"
            x_adv = shared if shared is not None else attack_all(
                spec, model, x, y, eps, seed, settings["batch_size"], device,
                progress(f"{where} attack", n))
            adv[lb] = x_adv
            entry, sigmas[lb], relative[lb] = _measure(
                model, x, x_adv, y, common, settings, device,
                progress(f"{where} measure", n * (2 + len(common))))
            layer_stats = entry.pop("layers")
            report["models"][lb] = {
                "model": entries[i]["spec"], "checkpoint": entries[i]["checkpoint"],
                "attack": spec.name, "eps": eps, "n": n, **entry,
                "reduction": settings["reduction"],
                "source_model": source[0] if source else None,
                "skipped_layers": skipped[lb], "layers": layer_stats}
    report["common_layers"] = common
    report["pairs"] = _pairs(labels, sigmas, common, settings["ratio"])
    report["settings"] = settings
    return _write(report, sigmas, relative, adv, y, out, args.save_adv)


def _measure(model, x, x_adv, y, layers: list[str], settings: dict[str, Any], device, bar):
    """Accuracies, σ, relative σ, per-image means, CI, top-k and intervention of one model."""
    import numpy as np
    import torch

    from robustkit.sensitivity import SensitivityMeter, intervention_test, top_k_neurons
    from robustkit.sensitivity.measure import per_sample_sensitivity
    from robustkit.utils import eval_mode

    n, bs, reduction = x.shape[0], settings["batch_size"], settings["reduction"]
    ratio, draws, seed = settings["ratio"], settings["draws"], settings["seed"]
    meter = SensitivityMeter(model, layers, reduction)
    rows: dict[str, list] = {ly: [] for ly in layers}
    clean_ok = adv_ok = 0
    batches = [(x[i:i + bs].to(device), x_adv[i:i + bs].to(device), y[i:i + bs].to(device))
               for i in range(0, n, bs)]
    with bar:
        for xb, xab, yb in batches:
            meter.update(xb, xab)
            for ly, r in per_sample_sensitivity(model, xb, xab, layers, reduction,
                                                batch_size=xb.shape[0]).items():
                rows[ly].append(r.mean(1))  # (nb,): each image's mean over the layer's neurons
            with torch.no_grad(), eval_mode(model):
                clean_ok += int((model(xb).argmax(1) == yb).sum())
                adv_ok += int((model(xab).argmax(1) == yb).sum())
            bar.update(2 * xb.shape[0])
        sigma, rel = meter.compute(), meter.compute(relative=True)
        out: dict[str, Any] = {"clean_accuracy": clean_ok / n, "adv_accuracy": adv_ok / n,
                               "layers": {}}
        # spatial_mean sums over images (MindArmour), so its layer mean is n x the image mean
        scale = n if reduction == "spatial_mean" else 1
        for ly in layers:
            s = sigma[ly]
            top = top_k_neurons(s, ratio=ratio)
            topk = rand = 0.0
            for xb, xab, yb in batches:
                # The same seed for every batch draws the same k random neurons for all images,
                # so the batched accuracies are those of one pass over all n images.
                r = intervention_test(model, xb, xab, yb, ly, s, ratio=ratio, draws=draws,
                                      generator=torch.Generator().manual_seed(seed))
                topk += round(r["topk"] * xb.shape[0])
                rand += r["random"] * xb.shape[0]
                bar.update(xb.shape[0])
            per_image = torch.cat(rows[ly]).numpy()
            lo, hi = bootstrap_ci(per_image, seed)
            out["layers"][ly] = {
                "mean": float(s.mean()), "median": float(np.median(s.numpy())),
                "relative_mean": float(rel[ly].mean()), "topk_mean": float(s[top].mean()),
                "ci95": [lo * scale, hi * scale],
                "intervention": {"topk": topk / n, "random": rand / n},
                "channels": s.numel(), "k": top.numel(), "topk_neurons": top.tolist()}
    return out, sigma, rel


def _pairs(labels: list[str], sigmas, common: list[str], ratio: float) -> list[dict[str, Any]]:
    """Jaccard overlap of the top-k sets of the first model and each other one, per layer."""
    from robustkit.sensitivity import jaccard, top_k_neurons

    pairs = []
    for other in labels[1:]:
        overlap: dict[str, float | None] = {}
        for ly in common:
            a, b = sigmas[labels[0]][ly], sigmas[other][ly]
            if a.numel() != b.numel():  # neuron m of one model is not neuron m of the other
                logger.warning("%s: %s has %d neurons, %s %d; no top-k overlap", ly, labels[0],
                               a.numel(), other, b.numel())
                overlap[ly] = None
                continue
            overlap[ly] = jaccard(top_k_neurons(a, ratio), top_k_neurons(b, ratio))
        pairs.append({"a": labels[0], "b": other, "jaccard": overlap})
    return pairs


def _write(report, sigmas, relative, adv, y, out: Path, save_adv: bool) -> int:
    import io

    import torch

    from robustkit.reports.sensitivity import FIGURES, write_figures, write_tensorboard
    from robustkit.utils import atomic_write, atomic_write_json, output_errors

    report["figures"] = list(FIGURES)
    report["tensorboard"] = "tb"
    path = out / "sensitivity.json"
    with output_errors(path):
        atomic_write_json(path, report)
    figures = write_figures(report, sigmas, out)
    write_tensorboard(sigmas, relative, out / "tb")
    if save_adv:
        buf = io.BytesIO()
        torch.save({"x_adv": adv, "y": y}, buf)
        with output_errors(out / "adv.pt"):
            atomic_write(out / "adv.pt", buf.getvalue())
    _print_table(report)
    print(f"results: {path}\nfigures: {', '.join(str(f) for f in figures)}\n"
          f"TensorBoard: tensorboard --logdir {out / 'tb'}")
    logger.info("wrote %s", path)
    return 0


def _print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    how = f"x' from {s['source_model']}" if s["source_model"] else "white-box"
    print(f"\nneuron sensitivity on the first {s['n']} {s['dataset']} test images: "
          f"{s['attack']} ({how}), Linf eps = {s['eps_text']}, {s['reduction']} sigma, "
          f"top-k ratio {s['ratio']:g}")
    width = max(len("model"), *(len(lb) for lb in report["models"])) + 2
    print(f"  {'model':<{width}}{'clean':>9}{'adversarial':>13}")
    for lb, m in report["models"].items():
        print(f"  {lb:<{width}}{100 * m['clean_accuracy']:>8.2f}%{100 * m['adv_accuracy']:>12.2f}%")
    lw = max(len("layer"), *(len(ly) for ly in report["common_layers"])) + 2
    print(f"\n  {'layer':<{lw}}{'model':<{width}}{'mean sigma [95% CI]':<36}{'relative':>10}"
          f"{'top-k':>11}{'restore top-k / random':>26}")
    for ly in report["common_layers"]:
        for lb, m in report["models"].items():
            e = m["layers"][ly]
            ci = f"{e['mean']:.4g} [{e['ci95'][0]:.4g}, {e['ci95'][1]:.4g}]"
            iv = (f"{100 * e['intervention']['topk']:.1f}% / "
                  f"{100 * e['intervention']['random']:.1f}%")
            print(f"  {ly:<{lw}}{lb:<{width}}{ci:<36}{e['relative_mean']:>10.4g}"
                  f"{e['topk_mean']:>11.4g}{iv:>26}")
    for pair in report["pairs"]:
        shown = ", ".join(f"{ly} {j:.2f}" if j is not None else f"{ly} -"
                          for ly, j in pair["jaccard"].items())
        print(f"  top-k overlap (Jaccard) {pair['a']} vs {pair['b']}: {shown}")
