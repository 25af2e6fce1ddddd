"""Full-strength adversarial pairs ``(x, x')`` (methods.md §4.1 [R]), shared by
``sensitivity.compare`` and ``saliency.compare``.

The paper measures on x' from PGD at full strength: L∞, α = ε/4, a uniform random start, every
image attacked for all K steps and the *last* iterate kept (no early stop), unlike evaluation's
best-iterate, stop-on-success PGD. ``"pgdK"`` uses the cross-entropy loss, ``"cwK"`` the CW margin.
The random starts come from a CPU generator seeded once per attacked model, so CPU and GPU draw
the same starts and a run is reproduced by its seed.

Example:
    >>> attack = full_strength_pgd(model, "pgd20", eps=8 / 255, seed=0)
    >>> x_adv = adversarial_pairs(attack, x, y, batch_size=256)       # (N, C, H, W) on the CPU
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["parse_pair_attack", "pair_attack_settings", "full_strength_pgd",
           "adversarial_pairs", "load_pairs", "check_images", "model_device", "null_progress",
           "Progress"]

# progress(name, total) -> a bar: a context manager with update(k) (tqdm's shape; the CLI passes
# tqdm bars, the library never imports tqdm)
Progress = Callable[[str, int], Any]


class _NullBar:
    """A bar that shows nothing."""

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, k: int = 1) -> None:
        """Nothing to show."""


def null_progress(name: str, total: int) -> _NullBar:
    """The default ``progress``: a bar that shows nothing.

    Example:
        >>> with null_progress("attack", len(x)) as bar:
        ...     bar.update(len(x))
    """
    return _NullBar()


def parse_pair_attack(attack: str):
    """``"pgdK"`` or ``"cwK"`` as an ``AttackSpec`` (K steps, one run: its last iterate is kept).

    Raises:
        ValueError: any other attack, restarts (``pgd20x5``) or a bad step count.

    Example:
        >>> spec = parse_pair_attack("pgd20")
        >>> spec.kind, spec.steps
        ('pgd', 20)
    """
    from robustkit.attacks.specs import parse_attacks

    specs = parse_attacks(attack)
    if len(specs) != 1 or specs[0].kind not in ("pgd", "cw") or specs[0].restarts != 1:
        raise ValueError(f"{attack!r}: expected one pgdK or cwK (K steps, e.g. pgd20); restarts "
                         "and other attacks do not apply (one run's last iterate is kept)")
    return specs[0]


def pair_attack_settings(attack: str, eps: float) -> dict[str, Any]:
    """The ``PGD`` keyword arguments of the full-strength attack (recorded in the reports).

    Example:
        >>> kw = pair_attack_settings("cw10", 0.3)
        >>> kw["loss"], kw["alpha"], kw["select"]
        ('cw', 0.075, 'last')
    """
    from robustkit.attacks.specs import ALPHA_FRACTION

    spec = parse_pair_attack(attack)
    return dict(eps=eps, alpha=ALPHA_FRACTION * eps, steps=spec.steps, random_start=True,
                norm="Linf", loss="ce" if spec.kind == "pgd" else "cw", restarts=1,
                # every image attacked for all K steps and the last iterate kept: sigma measures
                # the full-strength perturbation, not the first one that fooled the model
                stop_on_success=False, select="last")


def full_strength_pgd(model: nn.Module, attack: str = "pgd20", *, eps: float, seed: int = 0):
    """The paper's PGD on ``model``; random starts from a CPU generator seeded with ``seed``.

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to logits.
        attack: ``"pgdK"`` (CE loss) or ``"cwK"`` (CW margin), K steps; default ``"pgd20"``.
        eps: L∞ budget in [0, 1] pixel units; α = ε/4.
        seed: seed of the random starts.

    Example:
        >>> pgd = full_strength_pgd(model, "pgd20", eps=0.3, seed=0)
        >>> x_adv = pgd(x, y)
    """
    from robustkit.attacks import PGD

    return PGD(model, generator=torch.Generator().manual_seed(seed),
               **pair_attack_settings(attack, eps))


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: its first parameter's (or buffer's) device, else the CPU.

    Example:
        >>> xb = x[:64].to(model_device(model))
        >>> logits = model(xb)
    """
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def adversarial_pairs(attack: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, *,
                      batch_size: int = 256, device: torch.device | None = None,
                      progress: Progress | None = None, name: str = "attack") -> Tensor:
    """x' for every image, batch by batch, in order (a seeded attack is reproducible).

    Args:
        attack: ``attack(x, y) -> x'``, e.g. ``full_strength_pgd(model, ...)``.
        x, y: ``(N, C, H, W)`` in [0, 1] and ``(N,)`` labels, on any device.
        batch_size: images per attack call.
        device: where the batches go (default: the attack's model's device, else x's).
        progress: ``progress(name, total)`` bar factory counting images (default: none).
        name: the bar's name.

    Shape: returns ``(N, C, H, W)`` on the CPU.

    Example:
        >>> pgd = full_strength_pgd(model, "pgd20", eps=0.3, seed=0)
        >>> x_adv = adversarial_pairs(pgd, x, y, batch_size=64)
    """
    if device is None:
        model = getattr(attack, "model", None)
        device = model_device(model) if isinstance(model, nn.Module) else x.device
    parts = []
    with (progress or null_progress)(name, x.shape[0]) as bar:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            parts.append(attack(xb, yb).cpu())
            bar.update(xb.shape[0])
    return torch.cat(parts)


def check_images(name: str, t: Any, shape: tuple[int, ...] | None = None) -> Tensor:
    """``t`` when it is a float ``(N, C, H, W)`` image tensor with finite values in [0, 1] (and
    ``shape`` when given); a ``ValueError`` naming ``name`` and the first bad images otherwise.

    Example:
        >>> check_images("x_adv", x_adv, tuple(x.shape))
    """
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 4:
        got = (f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor)
               else type(t).__name__)
        raise ValueError(f"{name} must be a float (N, C, H, W) image tensor, got {got}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be shaped like x, {tuple(shape)}, got {tuple(t.shape)}")
    flat = t.detach().flatten(1)
    checks = (((~torch.isfinite(flat)).any(1), "NaN or infinite values"),
              (((flat < 0) | (flat > 1)).any(1), "values outside [0, 1]"))
    for bad, what in checks:
        if bool(bad.any()):
            idx = bad.nonzero().flatten().tolist()
            raise ValueError(f"{name} holds {what} in {len(idx)} image(s) (first: "
                             f"{idx[:5]})")
    return t


def load_pairs(path: str | Any, labels: list[str], x: Tensor, y: Tensor
               ) -> Tensor | dict[str, Tensor]:
    """The x' of a file for ``compare(x_adv=...)``: an ``adv.pt`` written by ``report.save(...,
    save_adv=True)`` (``robustkit sensitivity --save-adv``: ``{"x_adv": {label: x'}, "y": y}``),
    a ``{"x_adv": x'}`` dict or a bare ``(N, C, H, W)`` tensor (one x' for every model). Read
    weights-only (no code runs); the first ``len(x)`` images are used, and the file's labels,
    when it has them, must be those of ``x``.

    Returns:
        One tensor, or ``{label: tensor}`` for every label.

    Raises:
        ValueError: an unreadable or empty file, another layout, missing labels, a shape other
            than ``x``'s, fewer images than ``x``, NaN/inf or values outside [0, 1], or labels
            that differ from ``y``.

    Example:
        >>> x_adv = load_pairs("runs/sens/adv.pt", ["standard", "robust"], x, y)
        >>> report = compare(models, x, y, x_adv=x_adv)
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"cannot be read as a torch file (weights-only): {detail}") from None
    n = x.shape[0]
    given = data.get("x_adv") if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("y") is not None:
        fy = data["y"]
        if not isinstance(fy, Tensor) or fy.dim() != 1 or fy.shape[0] < n or not torch.equal(
                fy[:n].long().cpu(), y.long().cpu()):
            raise ValueError(f"its labels 'y' are not those of the first {n} images measured "
                             "(another dataset, order or --n-examples?)")
    if isinstance(given, dict):
        missing = [lb for lb in labels if lb not in given]
        if missing:
            raise ValueError(f"holds x' for {', '.join(map(str, given)) or 'no model'}, not for "
                             f"{', '.join(missing)}")
        return {lb: _first(f"x_adv[{lb!r}]", given[lb], x) for lb in labels}
    if isinstance(given, Tensor):
        return _first("x_adv", given, x)
    raise ValueError("expected a tensor, {'x_adv': tensor}, or adv.pt's {'x_adv': {label: "
                     f"tensor}}, 'y': labels}}, got {type(data).__name__}")


def _first(name: str, t: Any, x: Tensor) -> Tensor:
    if isinstance(t, Tensor) and t.dim() == 4 and t.shape[0] > x.shape[0]:
        t = t[:x.shape[0]]
    if isinstance(t, Tensor) and t.dim() == 4 and t.shape[0] < x.shape[0]:
        raise ValueError(f"{name} holds {t.shape[0]} images, fewer than the {x.shape[0]} "
                         "measured")
    return check_images(name, t, tuple(x.shape)).to(x.dtype)
