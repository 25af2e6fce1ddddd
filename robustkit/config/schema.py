"""Schemas: one dataclass per ``robustkit train`` section, and ``robustkit evaluate``'s flags.

``robustkit.config.loading`` merges YAML files and overrides onto them; the comment after a
field gives its units, its choices or what ``None`` means. Numbers are range-checked when a
config is loaded (``robustkit.config.validate``): counts are ints >= 1 (>= 0 where 0 has a
meaning), floats are finite, and ``trainer.out_dir`` must be creatable and writable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataConfig", "ModelConfig", "AttackConfig", "ObjectiveConfig", "OptimConfig",
           "TrainerConfig", "SensitivityConfig", "SaliencyConfig", "LogConfig", "TrainConfig",
           "EvalConfig"]


@dataclass
class DataConfig:
    """Dataset and loaders (``robustkit.data.build_loaders``)."""

    name: str = "cifar10"  # mnist cifar10 cifar100 tinyimagenet sample-mnist sample-cifar10
    root: str | None = None  # None: $ROBUSTKIT_DATA, else ./data
    batch_size: int = 128  # global: each of W ranks gets batch_size // W
    eval_batch_size: int | None = None  # holdout/test loaders; None: batch_size
    holdout: int = 1000  # training images held out for best-checkpoint selection (Rice et al.)
    num_workers: int = 0
    download: bool = False
    augment: bool = True  # crop + flip on CIFAR / Tiny-ImageNet (methods.md §2)
    limit: int | None = None  # train on the first N training images only (smoke runs)


@dataclass
class ModelConfig:
    """Architecture (``robustkit.models.create_model``); mean/std/shape come from the dataset."""

    name: str = "preact_resnet18"
    params: dict[str, Any] = field(default_factory=dict)  # extra create_model keyword arguments
    init_from: str | None = None  # weights to start from (fine-tuning): a robustkit last.pt /
    #   best.pt or a bare state_dict, loaded weights-only and strictly before training; not a
    #   resume (epochs, optimizer, objective start fresh). Relative to the current folder, ~ ok


@dataclass
class AttackConfig:
    """Optional training attack; ``name: null`` lets the objective build its own default one."""

    name: str | None = None  # e.g. pgd; built on the bare model and passed as attack=
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    """Training objective (``robustkit.objectives.create_objective``)."""

    name: str = "natural"  # natural pgd_at trades mart fat gairat awp srd_dat fast_at
    # igr jr sagr sns
    params: dict[str, Any] = field(default_factory=dict)  # checked against the constructor


@dataclass
class OptimConfig:
    """Optimizer and per-iteration learning-rate schedule."""

    name: str = "sgd"  # sgd | adam
    lr: float = 0.1  # peak learning rate (> 0)
    momentum: float = 0.9  # SGD momentum; Adam beta1; in [0, 1)
    weight_decay: float = 5e-4  # >= 0
    nesterov: bool = False
    schedule: str = "multistep"  # multistep | cosine | onecycle | constant
    milestones: list[float] = field(default_factory=lambda: [100.0, 105.0])  # <1: fractions
    gamma: float = 0.1  # multistep factor at each milestone, in (0, 1]
    warmup_epochs: float = 0.0  # linear warm-up from 0, <= epochs; onecycle: the peak (0: 2/5 of
    #                             training)


@dataclass
class TrainerConfig:
    """Training loop, evaluation during training and the run directory."""

    epochs: int = 1
    out_dir: str | None = None  # run directory; None: runs/<config name>
    resume: str | None = None  # a last.pt to continue from exactly
    amp: str = "off"  # off | bf16 | fp16
    grad_clip: float | None = None  # max global gradient norm
    device: str | None = None  # None/"auto": CUDA when available; torchrun: the local rank's GPU
    eval_every: int | None = 1  # epochs between held-out evaluations (>= 1); None: none at all
    eval_steps: int = 20  # PGD-k on the holdout split; eval_steps * eval_alpha must reach eps
    eval_eps: float | None = None  # None: the dataset's default eps for eval_norm; Linf: (0, 1]
    eval_alpha: float | None = None  # None: eps / 4, as robustkit evaluate's pgdK
    eval_norm: str = "Linf"
    eval_n: int = 1000  # the first eval_n holdout images evaluated (exactly: last batch cut)
    checkpoint_every: int = 1  # epochs between last.pt writes
    log_every: int = 50  # steps between scalar logs


@dataclass
class SensitivityConfig:
    """Neuron sensitivity σ of a fixed probe set during training (methods.md §4, §7.3), logged
    as ``sensitivity/<layer>`` (mean σ), ``sensitivity_rel/<layer>`` and TensorBoard histograms,
    for any objective. Rank 0 only; nothing is added to checkpoints."""

    enabled: bool = True  # on in every config: a probe costs about steps forward-backward
    #                       passes plus 2 forwards per probe image
    every: int | None = None  # epochs between probes; None: trainer.eval_every (null there:
    #                           after the last epoch only); always after the last epoch
    n: int = 256  # the first n held-out images (data.holdout): the same probe set in every run
    layers: Any = "auto"  # "auto": every conv and linear module; or a list of module names
    steps: int = 10  # PGD steps at the held-out eps (trainer.eval_eps / eval_norm), alpha =
    #                  eps/4 (>= 4 steps reach eps), uniform random start, last iterate


@dataclass
class SaliencyConfig:
    """Saliency maps of a fixed probe panel during training (methods.md §7.3, §8.2): one
    TensorBoard image grid per explainer (rows: images; columns x, map(x), x', map(x')) and
    ``saliency/<explainer>/<clean|adv>/<sparseness|total_variation>`` scalars. Rank 0 only;
    nothing is added to checkpoints."""

    enabled: bool = True  # on in every config: cheap (a few hundred input gradients per panel)
    every: int | None = None  # epochs between panels; None: trainer.eval_every (null there:
    #                           after the last epoch only); always after the last epoch
    n: int = 8  # the first n held-out images (data.holdout): the same panel in every run
    explainers: list[str] = field(default_factory=lambda: ["gradient", "smoothgrad",
                                                           "adaptgrad"])  # saliency.EXPLAINERS
    n_samples: int = 16  # SmoothGrad / AdaptGrad noisy samples (seed 0: the same noise always)
    steps: int = 10  # x': PGD steps at the held-out eps, alpha = eps/4, last iterate (as
    #                  sensitivity.steps)


@dataclass
class LogConfig:
    """Writers of the run directory."""

    tensorboard: bool = True  # out_dir/tb
    jsonl: bool = True  # out_dir/metrics.jsonl
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class TrainConfig:
    """The whole ``robustkit train`` configuration."""

    name: str | None = None  # experiment name; None: the config file's stem
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class EvalConfig:
    """The whole ``robustkit evaluate`` configuration: its flags, with underscores."""

    model: str | None = None  # NAME | FILE.py:FN | robustbench:NAME (required)
    checkpoint: str | None = None  # weights file, loaded weights-only and strictly
    dataset: str | None = None  # a key of robustkit.data.DATASETS (required)
    data_root: str | None = None  # None: $ROBUSTKIT_DATA, else ./data
    threat_model: str = "Linf"  # Linf | L2
    eps: float | None = None  # [0, 1] pixel units ("8/255" accepted); None: the dataset's
    n_examples: int | None = None  # the first N test images; None: all (RobustBench: 10,000)
    batch_size: int = 256  # images per attack call
    # RobustBench's number (AutoAttack standard) plus PGD-20 as a quick cross-check; a
    # comma-separated string is accepted too ("clean,pgd20").
    attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20", "autoattack"])
    aa_version: str = "standard"  # standard | plus | custom
    aa_attacks: list[str] | None = None  # with aa_version custom, e.g. [apgd-ce, apgd-t]
    protocol: str = "standalone"  # standalone | cascade
    out: str | None = None  # None: runs/evaluate/<name>-<dataset>-<threat_model>
    name: str | None = None  # entry name in the RobustBench JSON; None: from model
    seed: int = 0  # seed of the attacks' randomness
    device: str | None = None  # None: CUDA when available
