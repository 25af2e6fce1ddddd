"""``robustkit train -c configs/train/<file>.yaml [key=value ...]``: config → objects → Trainer.

The only place a training config becomes objects (architecture.md §4.1): load and save the
config; ranks; seed; loaders; model; attack; objective; optimizer and per-step LR schedule;
callbacks; ``Trainer(...).fit``. ``--dry-run`` builds all of it and trains nothing.

Example:
    >>> main(["train", "-c", "configs/smoke.yaml", "trainer.out_dir=/tmp/smoke"])
    >>> torchrun --nproc_per_node=4 -m robustkit train -c configs/train/cifar10_srd_dat.yaml
"""

from __future__ import annotations

import argparse
import bisect
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler, Subset

from robustkit.cli import user_input
from robustkit.config import load_config, save_config, to_container
from robustkit.errors import CheckpointError, ConfigError, OutputError
from robustkit.utils import output_errors

__all__ = ["add_parser", "run", "build", "Run"]

log = logging.getLogger(__name__)

_EPILOG = """\
overrides (key=value pairs, applied in order after the config file; values are YAML; put
flags such as --dry-run before or after all of them, not between):
  robustkit train -c configs/train/cifar10_trades.yaml trainer.epochs=1 objective.params.beta=3
  numbers, true/false, null, lists [0.5, 0.75], and fractions such as objective.params.eps=8/255.
  An unknown key fails with the nearest valid one; method hyper-parameters go under
  objective.params.<name> and are checked against the objective's constructor.

run directory: trainer.out_dir (default runs/<config name>/) gets config.yaml, last.pt, best.pt,
  metrics.jsonl and tb/ (tensorboard --logdir runs/); .lock refuses a second live run, and a
  folder holding last.pt is never overwritten: resume it or choose another out_dir.
  last.pt: every trainer.checkpoint_every epochs and always the final epoch, which is also always
  evaluated; best.pt: the best eval/pgd<k> so far (a tie keeps the earlier epoch).
resume: robustkit train -c <same config> trainer.resume=runs/<name>/last.pt
  (trainer.resume=auto: resume when out_dir holds last.pt, else start fresh)
multi-GPU: torchrun --nproc_per_node=4 -m robustkit train -c ... (data.batch_size is global)
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train a model from a YAML config (key=value overrides)",
        description="Train a model from a YAML config: robustkit train -c FILE [key=value ...]",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="YAML config, e.g. configs/train/cifar10_pgd_at.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. trainer.epochs=1 objective.params.eps=8/255")
    p.add_argument("--dry-run", action="store_true",
                   help="build data, model, objective, optimizer and callbacks; train nothing")
    p.add_argument("--data-root", metavar="DIR", help="same as data.root=DIR")
    p.add_argument("--download", action="store_true", help="same as data.download=true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.download:
        overrides.append("data.download=true")
    cfg = load_config(args.config, overrides)
    from robustkit import distributed as dist
    from robustkit.training.rundir import RunDirectory

    out = Path(cfg.trainer.out_dir)
    # Rank 0 owns the folder; read from the environment because the process group starts in
    # build(), after this check (torchrun sets RANK; a single process is rank 0).
    owner = int(os.environ.get("RANK", "0")) == 0 and not args.dry_run
    rundir = RunDirectory(out)
    try:
        # Before any model or data is loaded: a bad trainer.out_dir costs nothing. The lock is
        # held until the end, over config.yaml, checkpoints and logs.
        if owner:
            rundir.acquire()  # OutputError: a file, read-only, unwritable, or in use
            rundir.clean_tmp()  # safe: no other live run writes here
        elif out.exists() and not out.is_dir():
            raise OutputError(f"run directory {out} is an existing file, not a folder; "
                              "choose another trainer.out_dir")
        resume = _resume_path(cfg, announce=True)  # refuses to overwrite an earlier run
        r = build(cfg)
        main = dist.is_main()  # read before cleanup(): afterwards every process says rank 0
        if args.dry_run:
            if main:
                print(OmegaConf.to_yaml(cfg), end="")
                print(f"dry run: {r.describe()}; nothing trained")
            return 0
        if owner:
            _prepare_logs(rundir, resume, r.trainer.state)
            with output_errors(out / "config.yaml", f"; nothing trained: {_fix(out)}"):
                save_config(cfg, out / "config.yaml")
            log.info("training %s", r.describe())
        start = time.perf_counter()
        try:
            state = r.trainer.fit(r.loaders.train)
        except OutputError as err:  # a full disk while writing a checkpoint or a log
            raise OutputError(f"{err}; training stopped: {_fix(out)}") from err
        except KeyboardInterrupt:
            raise KeyboardInterrupt(_next(out)) from None
        if main:
            print(_summary(r, state, resume, time.perf_counter() - start))
    finally:
        rundir.release()
        dist.cleanup()  # no-op without torchrun
    return 0


def _resume_path(cfg: DictConfig, announce: bool = False) -> Path | None:
    """The checkpoint this run resumes from (``trainer.resume``, ``auto`` resolved), or None.

    ``auto``: ``<out_dir>/last.pt`` when it exists, else a fresh start. With ``announce``, says
    which in the log and refuses a run that would overwrite an earlier run's ``last.pt``: a
    fresh start (or a resume from a checkpoint outside ``out_dir``) in a folder holding one.

    Raises:
        OutputError: ``out_dir`` holds ``last.pt`` that this run would overwrite.
    """
    out, resume = Path(cfg.trainer.out_dir), cfg.trainer.resume
    last = out / "last.pt"
    if resume == "auto":
        path = last if last.is_file() else None
        if announce:
            if path is None:
                log.info("trainer.resume=auto: no last.pt in %s, starting fresh", out)
            else:
                log.info("trainer.resume=auto: resuming from %s", path)
        return path
    path = Path(resume) if resume else None
    if announce and path is not None and not path.is_file():  # before any data is loaded
        raise ConfigError(f"config key 'trainer.resume': checkpoint {resume!r} not found")
    inside = path is not None and path.resolve().parent == out.resolve()
    if announce and last.is_file() and not inside:
        what = f"resuming from {path}" if path is not None else "a fresh start"
        raise OutputError(
            f"run directory {out} already holds last.pt of an earlier run, which {what} would "
            f"overwrite: continue it with trainer.resume={last} (or trainer.resume=auto), or "
            "choose another trainer.out_dir"
        )
    return path


def _prepare_logs(rundir: Any, resume: Path | None, state: Any) -> None:
    """Logs that continue the resumed checkpoint exactly, or a clean slate for a fresh run."""
    fix = f"; nothing trained: {_fix(rundir.path)}"
    if resume is not None and resume.resolve().parent == rundir.path.resolve():
        # what the interrupted run logged after its checkpoint is rewritten by this run
        with output_errors(rundir.path / "metrics.jsonl", fix):
            rundir.trim_jsonl("metrics.jsonl", step=state.step, epoch=state.epoch)
    else:  # a fresh run (or one resumed from elsewhere): earlier files are not its own
        with output_errors(rundir.path, fix):
            rundir.start_fresh(("metrics.jsonl", "best.pt", "tb"))


def _next(out: Path) -> str:
    """How to go on after a stop: resume from ``last.pt`` when it exists."""
    last = out / "last.pt"
    if last.is_file():
        return f"resume with trainer.resume={last}"
    return "no last.pt was written yet: rerun the same command"


def _fix(out: Path) -> str:
    return f"free space or fix the folder, then {_next(out)}"


@dataclass
class Run:
    """Everything ``build`` wires (the CLI then calls ``trainer.fit(loaders.train)``)."""

    cfg: DictConfig
    loaders: Any
    model: torch.nn.Module  # the bare model
    objective: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainer: Any
    out_dir: Path
    steps_per_epoch: int

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        c = self.cfg
        images = len(self.loaders.train.dataset)  # what is trained on: data.limit applied
        return (f"{c.model.name} ({n / 1e6:.2f} M parameters) on {images} {c.data.name} "
                "training images, objective "
                f"{c.objective.name}, {c.trainer.epochs} epochs x {self.steps_per_epoch} steps, "
                f"device {self.trainer.device}, run dir {self.out_dir}")


def build(cfg: DictConfig, loaders: Any = None) -> Run:
    """Wire a validated config into objects (architecture.md §4.1), without training.

    Args:
        cfg: from ``load_config``.
        loaders: ``robustkit.data.Loaders`` to use instead of ``build_loaders`` (tests).
    """
    from robustkit import distributed as dist
    from robustkit.attacks import create_attack
    from robustkit.data import DATASETS, build_loaders
    from robustkit.models import create_model
    from robustkit.objectives import create_objective
    from robustkit.training.trainer import Trainer
    from robustkit.utils import seed_everything

    t, d = cfg.trainer, cfg.data
    # torch.device("gpu") raises RuntimeError; a CUDA device without CUDA, ValueError.
    with user_input(ConfigError, "trainer.device", (ValueError, RuntimeError)):
        info_dist = dist.init_from_env(t.device)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    if loaders is None:
        with user_input(ConfigError, "data"):  # DataError (a missing root) passes through
            loaders = build_loaders(
                d.name, root=d.root, batch_size=d.batch_size, holdout=d.holdout,
                download=d.download, num_workers=d.num_workers, seed=cfg.seed,
                augment=d.augment, eval_batch_size=d.eval_batch_size, limit=d.limit,
            )  # logs the number of training images used (data.limit applied)
    elif d.limit is not None:  # loaders given by the caller (tests)
        loaders.train = _limit(loaders.train, d.limit)
    info = getattr(loaders, "info", None) or DATASETS[d.name]
    channels, size = info.input_shape[0], info.input_shape[-1]
    with user_input(ConfigError, "model"):
        model = create_model(cfg.model.name, num_classes=info.num_classes, mean=info.mean,
                             std=info.std, in_channels=channels, input_size=size,
                             **_plain(cfg.model.params)).to(info_dist.device)
    # Different random starts per rank from here on (a single process keeps cfg.seed).
    seed_everything(cfg.seed + info_dist.rank)
    ddp_model = dist.wrap_ddp(model, info_dist.device)
    attack = None
    if cfg.attack.name is not None:  # else the objective builds its paper-default attack
        with user_input(ConfigError, "attack"):
            attack = create_attack(cfg.attack.name, model, **_plain(cfg.attack.params))
    with user_input(ConfigError, "objective"):  # unknown name or hyper-parameter, bad value
        objective = create_objective(cfg.objective.name, ddp_model, attack=attack,
                                     **_plain(cfg.objective.params))
    steps_per_epoch = len(loaders.train)
    optimizer = _optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(cfg, steps_per_epoch))  # a closure: not saved, rebuilt on resume
    out_dir = Path(t.out_dir)
    callbacks = _callbacks(cfg, loaders, info, out_dir, model)
    with user_input(ConfigError, "trainer"):
        trainer = Trainer(
            ddp_model, objective, optimizer, scheduler, epochs=t.epochs, amp=t.amp,
            grad_clip=t.grad_clip, scheduler_interval="step", device=info_dist.device,
            callbacks=callbacks,
        )
    resume = _resume_path(cfg)
    if resume is not None:
        _resume(trainer, resume, cfg)
    return Run(cfg, loaders, model, objective, optimizer, scheduler, trainer, out_dir,
               steps_per_epoch)


def _resume(trainer: Any, path: Path, cfg: DictConfig) -> None:
    """Load ``trainer.resume`` into the trainer; a checkpoint of another run is a user error."""
    from robustkit.training.checkpoint import load_checkpoint

    if not path.is_file():
        raise ConfigError(f"config key 'trainer.resume': checkpoint {str(path)!r} not found")
    fix = ("point trainer.resume at an intact checkpoint of this run (its best.pt, or an "
           "earlier copy), or drop it to start afresh in another trainer.out_dir")
    try:
        state = load_checkpoint(path)  # CheckpointError: corrupt (torn, empty) or refused
    except CheckpointError as err:
        raise CheckpointError(f"trainer.resume: {_short(err, 320)}; {fix}") from None
    _warn_changes(state.get("config") or {}, to_container(cfg))
    # load_state_dict raises RuntimeError (tensor shapes), KeyError (a missing entry) or
    # ValueError when the checkpoint was written by another model, optimizer or objective, or
    # is not a training checkpoint at all (a bare state_dict).
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"trainer.resume {str(path)!r} does not match this config: {_short(err)}; the "
            "checkpoint was written by another model, optimizer or objective (or is not a "
            "training checkpoint): resume with the config it was trained with"
        ) from err
    done = "; nothing left to train" if trainer.state.epoch >= trainer.epochs else ""
    log.info("resumed from %s at epoch %d, step %d%s", path, trainer.state.epoch,
             trainer.state.step, done)


def _short(err: BaseException, limit: int = 240) -> str:
    """One line of at most ``limit`` characters (a state_dict mismatch lists every key)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError):
        text = f"missing entry {text}"
    return text if len(text) <= limit else text[: limit - 5].rstrip() + " ..."


def _plain(node: Any) -> dict[str, Any]:
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}


def _limit(loader: DataLoader, n: int) -> DataLoader:
    """The same training loader over the first ``n`` images (same sampler settings)."""
    s = loader.sampler
    subset = Subset(loader.dataset, range(min(n, len(loader.dataset))))
    sampler = DistributedSampler(subset, num_replicas=s.num_replicas, rank=s.rank,
                                 shuffle=s.shuffle, seed=s.seed, drop_last=s.drop_last)
    return DataLoader(subset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def _optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":  # momentum doubles as beta1 (0.9: Adam's default)
        return torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.momentum, 0.999),
                                weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                           weight_decay=o.weight_decay, nesterov=o.nesterov)


def _lr_factor(cfg: DictConfig, steps_per_epoch: int):
    """LR multiplier per optimizer step; milestones < 1 are fractions of training, else epochs."""
    o, epochs = cfg.optim, cfg.trainer.epochs
    total = max(1, epochs * steps_per_epoch)
    warm = round(o.warmup_epochs * steps_per_epoch)
    marks = sorted(round((m * epochs if m < 1 else m) * steps_per_epoch) for m in o.milestones)
    schedule, gamma = o.schedule, o.gamma

    def factor(step: int) -> float:
        if schedule == "onecycle":  # 0 → lr at the peak → 0 (Smith; Wong et al., 2020)
            peak = warm or round(0.4 * total)
            return step / peak if step < peak else max(0.0, (total - step) / max(1, total - peak))
        f = 1.0
        if schedule == "multistep":
            f = gamma ** bisect.bisect_right(marks, step)
        elif schedule == "cosine":  # from the end of the warm-up to 0 at the last step
            f = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - warm) / max(1, total - warm))))
        return f * min(1.0, (step + 1) / warm) if warm else f

    return factor


def _holdout_attacks(cfg: DictConfig, info: Any, model: torch.nn.Module) -> dict[str, Any]:
    """The held-out evaluation's attack, built here because ``training/`` imports no attack.

    PGD-k as ``robustkit evaluate``'s ``pgdK`` (α = ε/4 unless ``trainer.eval_alpha``, uniform
    random start, CE, stop on success, the best iterate per sample) on the bare model; the
    config has checked that k·α reaches ε. Its random starts come from a CPU generator that
    the evaluation reseeds per batch, so every epoch sees the same starts.
    """
    from robustkit.attacks import PGD

    t = cfg.trainer
    eps = t.eval_eps if t.eval_eps is not None else info.eps[t.eval_norm]
    alpha = t.eval_alpha if t.eval_alpha is not None else eps / 4
    with user_input(ConfigError, "trainer.eval_*"):
        # stop_on_success: a broken point stays broken, so accuracy is unchanged and the
        # already-broken points cost no more gradient evaluations.
        pgd = PGD(model, eps=eps, alpha=alpha, steps=t.eval_steps, norm=t.eval_norm,
                  random_start=True, loss="ce", stop_on_success=True, select="best",
                  generator=torch.Generator())
    return {f"pgd{t.eval_steps}": pgd}


def _probe_perturb(cfg: DictConfig, info: Any, model: torch.nn.Module,
                   section: str = "sensitivity"):
    """The sensitivity probe's (or saliency panel's) attack, ``perturb(model, x, y, generator)
    -> x_adv``.

    PGD at the held-out ε and norm (``trainer.eval_eps``/``eval_norm``): ``<section>.steps``
    steps of ε/4, uniform random start from the callback's generator, CE, the last iterate and
    no early stop, so every probe pair is a full-budget x' (methods.md §4.1's pairs, PGD-10
    instead of PGD-20 to keep the probe cheap). Built here because ``training/`` imports no
    attack; checked once on ``model`` so a bad setting fails at wiring, not after an epoch.
    """
    from robustkit.attacks import PGD

    t, s = cfg.trainer, cfg[section]
    eps = t.eval_eps if t.eval_eps is not None else info.eps[t.eval_norm]
    if s.steps < 4:  # s.steps * eps/4 must reach eps: a weaker x' understates σ
        raise ConfigError(f"config key '{section}.steps' must be >= 4 (steps of eps/4 must "
                          f"reach eps), got {s.steps}")
    settings = dict(eps=eps, alpha=eps / 4, steps=s.steps, norm=t.eval_norm, random_start=True,
                    loss="ce", stop_on_success=False, select="last")
    with user_input(ConfigError, section):
        PGD(model, **settings, generator=torch.Generator())

    def perturb(bare: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        return PGD(bare, **settings, generator=generator)(x, y)

    return perturb


def _eval_interval(t: DictConfig) -> int:
    """The probes' default interval: ``trainer.eval_every``, or with no held-out evaluation
    (``eval_every: null``) ``trainer.epochs``, so they run after the last epoch only."""
    return t.eval_every if t.eval_every is not None else t.epochs


def _sensitivity(cfg: DictConfig, loaders: Any, info: Any, model: torch.nn.Module) -> list[Any]:
    """``[SensitivityCallback]`` from the ``sensitivity`` section, or ``[]`` (disabled, no
    held-out split). Rank 0 measures on the bare model (the callback skips other ranks)."""
    from robustkit.sensitivity import resolve_layers
    from robustkit.training.callbacks import SensitivityCallback

    s, t = cfg.sensitivity, cfg.trainer
    if not s.enabled:
        return []
    if loaders.holdout is None or len(loaders.holdout.dataset) == 0:
        log.warning("sensitivity: no held-out split (data.holdout=0): no sensitivity/* logged")
        return []
    # None: with the held-out evaluation; eval_every null (none): after the last epoch only
    every = s.every if s.every is not None else _eval_interval(t)
    if not (isinstance(s.layers, str) or OmegaConf.is_list(s.layers)):
        raise ConfigError(f"config key 'sensitivity.layers' must be 'auto' or a list of module "
                          f"names, got {s.layers!r}")
    layers = s.layers if isinstance(s.layers, str) else [str(n) for n in s.layers]
    with user_input(ConfigError, "sensitivity.layers"):
        layers = resolve_layers(model, layers)  # an unknown name lists the valid ones now
    perturb = _probe_perturb(cfg, info, model)
    # seed 0, not cfg.seed: runs with different seeds start their probe PGD at the same points
    with user_input(ConfigError, "sensitivity"):
        return [SensitivityCallback(loaders.holdout, perturb, layers=layers, n=s.n, every=every,
                                    batch_size=loaders.holdout.batch_size, seed=0)]


def _saliency(cfg: DictConfig, loaders: Any, info: Any, model: torch.nn.Module) -> list[Any]:
    """``[SaliencyCallback]`` from the ``saliency`` section, or ``[]`` (disabled, no held-out
    split). Rank 0 explains on the bare model (the callback skips other ranks); its grids reach
    TensorBoard through ``TensorBoardCallback(image_fn=cb.images)``."""
    from robustkit.saliency import EXPLAINERS
    from robustkit.training.callbacks import SaliencyCallback

    s, t = cfg.saliency, cfg.trainer
    if not s.enabled:
        return []
    if loaders.holdout is None or len(loaders.holdout.dataset) == 0:
        log.warning("saliency: no held-out split (data.holdout=0): no saliency panel logged")
        return []
    every = s.every if s.every is not None else _eval_interval(t)
    names = [s.explainers] if isinstance(s.explainers, str) else list(s.explainers or [])
    bad = [str(n) for n in names if n not in EXPLAINERS]
    if not names or bad:
        raise ConfigError(f"config key 'saliency.explainers' must be a non-empty list of "
                          f"{sorted(EXPLAINERS)}, got unknown {bad or names}")
    perturb = _probe_perturb(cfg, info, model, section="saliency")
    # seed 0, not cfg.seed: runs with different seeds see the same x' and the same noise
    with user_input(ConfigError, "saliency"):
        return [SaliencyCallback(loaders.holdout, perturb, explainers=[str(n) for n in names],
                                 n=s.n, every=every, n_samples=s.n_samples, seed=0)]


def _callbacks(cfg: DictConfig, loaders: Any, info: Any, out_dir: Path,
               model: torch.nn.Module) -> list[Any]:
    from robustkit import distributed as dist
    from robustkit.training.callbacks import (
        CheckpointCallback,
        EvalCallback,
        JSONLCallback,
        TensorBoardCallback,
    )

    t = cfg.trainer
    callbacks: list[Any] = []
    # Order matters: evaluation fills eval/* before the loggers and the checkpoint read it.
    if t.eval_every is not None and loaders.holdout is not None:
        with user_input(ConfigError, "trainer.eval_*"):
            callbacks.append(EvalCallback(
                loaders.holdout, _holdout_attacks(cfg, info, model), every=t.eval_every,
                n=t.eval_n, seed=cfg.seed))  # exactly eval_n images: the last batch cut short
    # Also before the loggers: it adds sensitivity/* to the epoch's metrics and histograms.
    callbacks.extend(_sensitivity(cfg, loaders, info, model))
    # Also before the loggers: saliency/* scalars; its grids go through TensorBoard's image_fn.
    saliency = _saliency(cfg, loaders, info, model)
    callbacks.extend(saliency)
    if cfg.log.jsonl:
        callbacks.append(JSONLCallback(out_dir / "metrics.jsonl", log_every=t.log_every))
    if cfg.log.tensorboard:
        hparams = {"seed": cfg.seed, "data": cfg.data.name, "model": cfg.model.name,
                   "objective": {"name": cfg.objective.name, **_plain(cfg.objective.params)},
                   "optim": {k: cfg.optim[k] for k in ("name", "lr", "weight_decay", "schedule")},
                   "epochs": t.epochs, "batch_size": cfg.data.batch_size}
        # image_every=1: the saliency callback's images() is empty when it did not explain
        callbacks.append(TensorBoardCallback(out_dir / "tb", config_text=OmegaConf.to_yaml(cfg),
                                             log_every=t.log_every, hparams=hparams,
                                             image_fn=saliency[0].images if saliency else None))
    if cfg.log.progress and dist.is_main():
        from robustkit.cli.progress import ProgressCallback

        callbacks.append(ProgressCallback())
    # Last: an epoch's logs reach the disk before its checkpoint, so a run killed between them
    # has logs ahead of last.pt (trimmed on resume), never a line missing behind it.
    callbacks.append(CheckpointCallback(out_dir, config=to_container(cfg),
                                        monitor=f"eval/pgd{t.eval_steps}",
                                        every=t.checkpoint_every))
    return callbacks


def _warn_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> None:
    """Log config keys that differ from the checkpoint's (a resume should change few)."""
    expected = {"trainer.resume", "trainer.epochs", "trainer.out_dir"}
    for key in sorted(set(old) | set(new)):
        a, b, full = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_changes(a, b, f"{full}.")
        elif a != b and full not in expected:
            log.warning("resume: %s was %r in the checkpoint, now %r", full, a, b)


def _summary(r: Run, state: Any, resume: Path | None, seconds: float) -> str:
    """What was trained and where it is; names only the files that exist."""
    metrics = state.metrics
    shown = {k: v for k, v in metrics.items() if k.startswith("eval/") or k == "train/acc"}
    since = f" (resumed from {resume})" if resume is not None else ""
    lines = [f"trained {r.cfg.objective.name} {r.cfg.model.name} on {r.cfg.data.name} for "
             f"{state.epoch} epochs in {seconds:.1f} s{since}",
             "  final: " + (", ".join(f"{k}={v:.4f}" for k, v in shown.items()) or "-")]
    files = [n for n in ("config.yaml", "last.pt") if (r.out_dir / n).is_file()]
    if state.best is not None and (r.out_dir / "best.pt").is_file():
        monitor = f"eval/pgd{r.cfg.trainer.eval_steps}"
        files.append(f"best.pt [{monitor}={state.best:.4f}, epoch {state.best_epoch}]")
    if r.cfg.log.jsonl and (r.out_dir / "metrics.jsonl").is_file():
        files.append("metrics.jsonl")
    lines.append(f"  run dir: {r.out_dir}  ({', '.join(files) or 'no files written'})")
    if r.cfg.log.tensorboard and (r.out_dir / "tb").is_dir():
        lines.append(f"  tensorboard --logdir {r.out_dir / 'tb'}")
    return "\n".join(lines)
