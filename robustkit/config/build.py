"""A training config -> the objects of a run (architecture.md §4.1), for the CLI and notebooks.

``build`` is what ``robustkit train`` calls: ranks, seed, loaders, model, attack, objective,
optimizer and per-step LR schedule, callbacks and ``Trainer``, resumed from
``trainer.resume`` when set; nothing is trained or written. ``Run.fit()`` then trains as the CLI
does: the run directory locked, its logs continued or set aside, ``config.yaml`` written,
``Trainer.fit``. Library classes keep taking keyword arguments (rule 4): only this module turns
a config into objects. ``robustkit.config.build`` is this module's function (the package
attribute shadows the module: patch internals through ``sys.modules["robustkit.config.build"]``).

Example:
    >>> run = build("configs/smoke.yaml", ["trainer.out_dir=/tmp/smoke", "trainer.device=cpu"])
    >>> state = run.fit()
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler, Subset

from robustkit.config.callbacks import _plain, wire_callbacks
from robustkit.config.loading import build_config, load_config, save_config, to_container
from robustkit.errors import CheckpointError, ConfigError, OutputError, user_input
from robustkit.utils import output_errors

__all__ = ["Run", "build", "claim_run_dir", "save_eval_config"]

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything ``build`` wires; ``fit()`` trains it.

    Attributes:
        cfg: the validated, read-only config.
        loaders: ``robustkit.data.Loaders`` (``train``, ``holdout``, ``test``, ``info``).
        model: the bare model (``trainer.model`` is its DDP wrapper under torchrun).
        objective, optimizer, scheduler, trainer: as passed to ``Trainer``.
        out_dir: the run directory (``trainer.out_dir``).
        steps_per_epoch: optimizer steps per epoch on this rank.
        resume: the checkpoint the trainer was resumed from, or ``None``.

    Example:
        >>> run = build(load_config("configs/smoke.yaml"))
        >>> run.describe()
    """

    cfg: DictConfig
    loaders: Any
    model: torch.nn.Module
    objective: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainer: Any
    out_dir: Path
    steps_per_epoch: int
    resume: Path | None = None

    def describe(self) -> str:
        """One line: model, parameters, training images, objective, epochs, device, folder."""
        n = sum(p.numel() for p in self.model.parameters())
        c = self.cfg
        images = len(self.loaders.train.dataset)  # what is trained on: data.limit applied
        return (f"{c.model.name} ({n / 1e6:.2f} M parameters) on {images} {c.data.name} "
                "training images, objective "
                f"{c.objective.name}, {c.trainer.epochs} epochs x {self.steps_per_epoch} steps, "
                f"device {self.trainer.device}, run dir {self.out_dir}")

    def summary(self, state: Any, seconds: float) -> str:
        """What was trained and where it is (the lines ``robustkit train`` prints at the end);
        names only the files that exist."""
        shown = {k: v for k, v in state.metrics.items()
                 if k.startswith("eval/") or k == "train/acc"}
        since = f" (resumed from {self.resume})" if self.resume is not None else ""
        c, out = self.cfg, self.out_dir
        lines = [f"trained {c.objective.name} {c.model.name} on {c.data.name} for "
                 f"{state.epoch} epochs in {seconds:.1f} s{since}",
                 "  final: " + (", ".join(f"{k}={v:.4f}" for k, v in shown.items()) or "-")]
        files = [n for n in ("config.yaml", "last.pt") if (out / n).is_file()]
        if state.best is not None and (out / "best.pt").is_file():
            monitor = f"eval/pgd{c.trainer.eval_steps}"
            files.append(f"best.pt [{monitor}={state.best:.4f}, epoch {state.best_epoch}]")
        if c.log.jsonl and (out / "metrics.jsonl").is_file():
            files.append("metrics.jsonl")
        lines.append(f"  run dir: {out}  ({', '.join(files) or 'no files written'})")
        if c.log.tensorboard and (out / "tb").is_dir():
            lines.append(f"  tensorboard --logdir {out / 'tb'}")
        return "\n".join(lines)

    def fit(self, rundir: Any = None) -> Any:
        """Train as ``robustkit train`` does; returns the final ``TrainerState``.

        Rank 0 holds the run directory's lock, continues the logs of the checkpoint it resumed
        from (or moves an earlier run's aside) and writes ``config.yaml`` before the first step.

        Args:
            rundir: a ``RunDirectory`` the caller already acquired (the CLI locks the folder
                before building); ``None``: acquired here and released at the end.

        Raises:
            OutputError: the folder is locked or cannot be written (says how to resume).
            KeyboardInterrupt: with how to go on (resume from ``last.pt``) as its message.

        Example:
            >>> state = build("configs/smoke.yaml", ["trainer.device=cpu"]).fit()
            >>> state.metrics["eval/pgd3"]
        """
        from robustkit import distributed as dist
        from robustkit.training.rundir import RunDirectory

        main, out = dist.is_main(), self.out_dir
        own = rundir is None and main
        if own:
            rundir = RunDirectory(out)
            rundir.acquire()  # OutputError: a file, read-only, unwritable, or in use
            rundir.clean_tmp()  # safe: no other live run writes here
        try:
            if main:
                _prepare_logs(rundir, self.resume, self.trainer.state)
                with output_errors(out / "config.yaml", f"; nothing trained: {_fix(out)}"):
                    save_config(self.cfg, out / "config.yaml")
                log.info("training %s", self.describe())
            try:
                return self.trainer.fit(self.loaders.train)
            except OutputError as err:  # a full disk while writing a checkpoint or a log
                raise OutputError(f"{err}; training stopped: {_fix(out)}") from err
            except KeyboardInterrupt:
                raise KeyboardInterrupt(_next(out)) from None
        finally:
            if own:
                rundir.release()


def build(
    config: DictConfig | Mapping[str, Any] | str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    loaders: Any = None,
    callbacks: Sequence[Any] = (),
) -> Run:
    """Wire a training config into a ``Run`` (architecture.md §4.1), without training.

    The same objects ``robustkit train`` builds, in the same order from the same seeds, so
    ``build(cfg).fit()`` in a notebook is the CLI's run. Before any data or model is loaded,
    ``trainer.resume`` is resolved (``auto``: ``last.pt`` in ``out_dir`` when present) and a
    fresh start over an earlier run's ``last.pt`` is refused. Starts the ``torch.distributed``
    process group under torchrun.

    Args:
        config: a config from ``load_config``/``build_config``, a YAML file, or a nested
            dict as read from YAML (missing keys take the schema's defaults).
        overrides: dotted ``key=value`` strings applied on top (e.g. ``"trainer.epochs=1"``).
        loaders: ``robustkit.data.Loaders`` to use instead of ``build_loaders`` (tests).
        callbacks: more trainer callbacks, run after the evaluation, probes and loggers and
            before the checkpoint (the CLI adds its progress bar: ``log.progress`` is the
            CLI's, the library shows none).

    Returns:
        The ``Run``; ``run.fit()`` trains it.

    Raises:
        ConfigError: a bad value, found while wiring (names the key).
        OutputError: ``out_dir`` holds ``last.pt`` that this run would overwrite.
        CheckpointError: ``trainer.resume`` is not a checkpoint of this config.
        DataError: the dataset root is missing or malformed.

    Example:
        >>> run = build("configs/smoke.yaml", ["trainer.device=cpu", "log.progress=false"])
        >>> state = run.fit()
    """
    from robustkit import distributed as dist
    from robustkit.attacks import create_attack
    from robustkit.data import DATASETS, build_loaders
    from robustkit.models import create_model
    from robustkit.objectives import create_objective
    from robustkit.training.trainer import Trainer
    from robustkit.utils import seed_everything

    cfg = _config(config, overrides)
    resume = _resume_path(cfg)  # before anything is loaded: refusals cost nothing
    init_from = _init_path(cfg, resume)
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
    if init_from is not None:  # before DDP wraps it: every rank loads the same weights
        _init_weights(model, init_from, cfg.model.init_from, cfg.model.name)
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
    every = wire_callbacks(cfg, loaders, info, out_dir, model, list(callbacks))
    with user_input(ConfigError, "trainer"):
        trainer = Trainer(
            ddp_model, objective, optimizer, scheduler, epochs=t.epochs, amp=t.amp,
            grad_clip=t.grad_clip, scheduler_interval="step", device=info_dist.device,
            callbacks=every,
        )
    if resume is not None:
        _resume(trainer, resume, cfg)
    return Run(cfg, loaders, model, objective, optimizer, scheduler, trainer, out_dir,
               steps_per_epoch, resume)


def claim_run_dir(out: Path, own: bool) -> Any:
    """The ``RunDirectory`` of a training run, claimed before any model or data is loaded (a bad
    ``trainer.out_dir`` costs nothing): the owner (rank 0 of a real run) takes the lock, held
    over config.yaml, checkpoints and logs until ``release()``, and removes stale temporary
    files; everyone else (other ranks, ``--dry-run``) only checks that ``out`` is no file.

    Raises:
        OutputError: a file, read-only, unwritable, or in use by another live run.
    """
    from robustkit.training.rundir import RunDirectory

    rundir = RunDirectory(out)
    if own:
        try:
            rundir.acquire()
            rundir.clean_tmp()  # safe: no other live run writes here
        except BaseException:
            rundir.release()
            raise
    elif out.exists() and not out.is_dir():
        raise OutputError(f"run directory {out} is an existing file, not a folder; "
                          "choose another trainer.out_dir")
    return rundir


def save_eval_config(cfg: Any, path: Path) -> None:
    """``robustkit evaluate``'s resolved settings to ``path`` (``config.yaml`` beside the
    results); a failed write (full disk, read-only) is one ``OutputError`` line."""
    with output_errors(path, "; the evaluation state is intact: free space or fix the "
                             "permissions and rerun the same command (nothing is recomputed)"):
        save_config(cfg, path)


def _config(config: Any, overrides: Sequence[str]) -> DictConfig:
    """``config`` as a validated ``DictConfig`` with ``overrides`` applied."""
    if isinstance(config, DictConfig):
        if not overrides:
            return config
        return build_config(to_container(config), overrides, name=config.name)
    if isinstance(config, Mapping):
        return build_config(dict(config), overrides)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    raise TypeError(f"config must be a DictConfig, a dict or a YAML path, got "
                    f"{type(config).__name__}")


def _resume_path(cfg: DictConfig) -> Path | None:
    """The checkpoint this run resumes from (``trainer.resume``, ``auto`` resolved), or None.

    ``auto``: ``<out_dir>/last.pt`` when it exists, else a fresh start; the log says which.
    Refuses a run that would overwrite an earlier run's ``last.pt``: a fresh start (or a
    resume from a checkpoint outside ``out_dir``) in a folder holding one.

    Raises:
        ConfigError: ``trainer.resume`` names a file that does not exist.
        OutputError: ``out_dir`` holds ``last.pt`` that this run would overwrite.
    """
    out, resume = Path(cfg.trainer.out_dir), cfg.trainer.resume
    last = out / "last.pt"
    if resume == "auto":
        path = last if last.is_file() else None
        if path is None:
            log.info("trainer.resume=auto: no last.pt in %s, starting fresh", out)
        else:
            log.info("trainer.resume=auto: resuming from %s", path)
        return path
    path = Path(resume) if resume else None
    if path is not None and not path.is_file():  # before any data is loaded
        raise ConfigError(f"config key 'trainer.resume': checkpoint {resume!r} not found")
    inside = path is not None and path.resolve().parent == out.resolve()
    if last.is_file() and not inside:
        what = f"resuming from {path}" if path is not None else "a fresh start"
        raise OutputError(
            f"run directory {out} already holds last.pt of an earlier run, which {what} would "
            f"overwrite: continue it with trainer.resume={last} (or trainer.resume=auto), or "
            "choose another trainer.out_dir"
        )
    return path


def _init_path(cfg: DictConfig, resume: Path | None) -> Path | None:
    """``model.init_from`` as a path (``~`` expanded, relative to the current folder), checked
    before any data is loaded; ``None`` when unset or when resuming (the weights then come from
    the resumed checkpoint, which already continues the fine-tuning).

    Raises:
        ConfigError: the file does not exist.
    """
    init = cfg.model.init_from
    if init is None:
        return None
    path = Path(os.path.expanduser(init))
    if resume is not None:
        log.info("model.init_from=%s not loaded: resuming from %s, whose weights continue it",
                 init, resume)
        return None
    if not path.is_file():
        raise ConfigError(f"config key 'model.init_from': checkpoint {init!r} not found "
                          f"(relative paths start from {os.getcwd()})")
    return path


def _init_weights(model: torch.nn.Module, path: Path, given: str, name: str) -> None:
    """Load ``model.init_from`` into ``model`` strictly: the weights only, never a resume.

    Accepts robustkit's checkpoints (``last.pt``/``best.pt``: the weights under ``"model"``)
    and a bare ``state_dict`` (``robustkit.models.load_state_dict_file``, ``weights_only``),
    with the wrapper's keys or the bare architecture's (the model then keeps its mean/std), as
    ``robustkit evaluate --checkpoint`` accepts them.

    Raises:
        ConfigError: unreadable, refused (pickled objects), no state dict, or keys/shapes that
            differ from the model's (named, a few of each), in one line.
    """
    from robustkit.errors import ModelError
    from robustkit.models._keys import state_dict_mismatch
    from robustkit.models.loading import load_state_dict_file, wrapped_state

    key = f"config key 'model.init_from' ({given})"
    try:
        state = wrapped_state(model, load_state_dict_file(path), path)
    except ModelError as err:
        raise ConfigError(f"{key}: {_short(err, 320)}") from None
    problem = state_dict_mismatch(model, state)
    if problem:
        raise ConfigError(f"{key} does not match model.name={name} (with model.params and the "
                          f"dataset's classes/channels): {problem}")
    model.load_state_dict(state, strict=True)
    log.info("model.init_from: weights loaded from %s (%d tensors); epochs, optimizer and "
             "objective start fresh", path, len(state))


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


def _warn_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> None:
    """Log config keys that differ from the checkpoint's (a resume should change few)."""
    expected = {"trainer.resume", "trainer.epochs", "trainer.out_dir"}
    for key in sorted(set(old) | set(new)):
        a, b, full = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_changes(a, b, f"{full}.")
        elif a != b and full not in expected:
            log.warning("resume: %s was %r in the checkpoint, now %r", full, a, b)


