"""SRD-DAT against a plain re-implementation of methods.md §3.3 (issue 18, "pinned maths").

The reductions in test_objectives.py run SRD-DAT where its maths cancels (eps_lo = eps_hi,
misclassified="uniform", q = 1, ...), so a one-line slip in ``srd_dat.py`` or ``functional.py``
survives them. Here SRD-DAT is written once more, with per-sample Python loops and nothing from
``robustkit.objectives`` but the class under test, and compared in float64 on batches built so
that every term acts: eps_lo < eps_hi, misclassified samples, negative skewness, a score EMA with
μ = 0.3 over three visits, q = 2.5 and 0.5, samples that freeze early and samples that run every
step, the MART factor, beta_ce > 0, γ strictly inside its ramp, a binding weight clip whose
single clip-and-renormalise pass is not the fixed point, the η0 floor binding, a τ schedule whose
last breakpoint ends before the last epoch, and a model whose BatchNorm and dropout make train
and eval mode differ.

Module A's probabilities are float32 in the library (``softmax(logits.float())``) and its score
memory is float32, so budgets agree to ~1e-7 relative; everything downstream is float64.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attacks.base import AttackResult
from robustkit.objectives import SRDDAT, TrainContext

K = 10  # classes
M = 4  # pixels per class group: x has shape (N, 1, K, M)
SKIP = 40.0  # logit_k = SKIP · mean(x[:, 0, k]) + mlp(x): the test writes the clean logits
S_MAX = (K - 2) / math.sqrt(K - 1)
REL = 1e-6  # Module A runs in float32 inside the library (its absolute errors: ~1e-7)
ATOL_X = 1e-7


class Net(nn.Module):
    """A direct class-group term (so the test can write each sample's clean probabilities) plus a
    small MLP whose BatchNorm (running statistics far from the batch's) and dropout make train
    and eval mode give different logits."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(K * M, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Dropout(0.2), nn.Linear(16, K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return SKIP * flat.view(-1, K, M).mean(2) + self.mlp(flat)


def _model() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        bn = net.mlp[1]
        bn.running_mean.copy_(0.4 * torch.randn(16))
        bn.running_var.copy_(0.3 + torch.rand(16))
    return net.double().train()


# Each row: (label, clean logits before the MLP's share). Rows are chosen for what they exercise.
_DESIGN = [
    (0, [30, 4, 4, 4, 4, 4, 4, 4, 4, 4]),  # peaked, far from the boundary: runs every step
    (3, [5, 6, 4, 26, 5, 3, 6, 4, 5, 6]),  # robust
    (1, [8, 12, 11, 3, 3, 3, 3, 3, 3, 3]),  # fragile: one rival close
    (2, [13, 13, 13.4, 13, 13, 13, 13, 3, 3, 3]),  # rival mass gathered in six classes: s < 0
    (4, [12, 12, 12, 12, 12.3, 12, 12, 12, 12, 0]),  # near the mirrored one-hot: s ≈ -s_max/2
    (5, [3, 3, 3, 3, 3, 10, 14, 3, 3, 3]),  # misclassified
    (6, [3, 12, 3, 3, 3, 3, 11, 3, 3, 3]),  # misclassified, close
    (7, [4, 4, 4, 4, 4, 4, 4, 17, 15, 4]),  # medium margin
    (8, [6, 6, 6, 6, 6, 6, 6, 6, 20, 6]),  # robust
    (9, [9, 9, 9, 9, 9, 9, 9, 9, 9, 13]),  # flat rivals: small gap, positive skew
    (0, [16, 15.5, 2, 2, 2, 2, 2, 2, 2, 2]),  # tiny gap
    (5, [2, 2, 2, 2, 2, 24, 2, 2, 21, 2]),  # large logits, moderate margin
]
N = len(_DESIGN)


def _batch(seed: int = 0, jitter: float = 0.04, shift: float = 0.0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels of group k spread around logit_k / SKIP with the group mean kept (some pixels near
    0 and 1, so the [0, 1] box binds in the attack too); ``shift`` moves each group mean by up
    to that much (``shift·SKIP`` in logits)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([row for _, row in _DESIGN], dtype=torch.float64) / SKIP
    base = base + shift * (2 * torch.rand((N, K), generator=g, dtype=torch.float64) - 1)
    noise = jitter * (2 * torch.rand((N, K, M), generator=g, dtype=torch.float64) - 1)
    noise = noise - noise.mean(2, keepdim=True)
    x = (base[:, :, None] + noise).clamp(0, 1)[:, None]
    y = torch.tensor([label for label, _ in _DESIGN])
    return x, y


# ----------------------------------------------------------------------------- the oracle
class Oracle:
    """methods.md §3.3 written out: Module A per sample, the early-stopped PGD-KL per sample,
    Module B over the batch (BatchNorm's batch statistics need the whole batch)."""

    def __init__(self, model, *, eps_hi=8 / 255, eps_lo=4 / 255, q=1.0, lambda_gap=0.7,
                 step_ratio=0.25, k_max=10, tau_schedule=((0.4, 0), (0.75, 1), (1.0, 2)),
                 misclassified="clean", beta=6.0, gamma_max=1.0, gamma_ramp=(0.3, 0.6),
                 omega_max=5.0, eta0=1 / 16, score_ema=None, mart_factor=False, beta_ce=0.0):
        self.model = model
        self.eps_hi, self.eps_lo, self.q, self.lam = eps_hi, eps_lo, q, lambda_gap
        self.step_ratio, self.k_max, self.sched = step_ratio, k_max, tau_schedule
        self.misclassified, self.beta, self.gamma_max = misclassified, beta, gamma_max
        self.ramp, self.omega_max, self.eta0 = gamma_ramp, omega_max, eta0
        self.mu, self.mart, self.beta_ce = score_ema, mart_factor, beta_ce
        self.memory: dict[int, float] = {}

    # schedules ---------------------------------------------------------------
    def tau(self, epoch, epochs):
        """FAT's rule: epochs counted from 1 (FAT.py: adjust_tau(epoch + 1)); the τ of the first
        breakpoint f with epoch_1 <= f·T; past the last breakpoint its τ holds."""
        if self.sched is None or isinstance(self.sched, int):
            return self.sched
        for fraction, tau in self.sched:
            if epoch + 1 <= fraction * epochs + 1e-9:
                return tau
        return self.sched[-1][1]

    def gamma(self, epoch, epochs):
        t, (a, b) = epoch / epochs, self.ramp
        if t < a - 1e-9:
            return 0.0
        if t >= b - 1e-9:
            return self.gamma_max
        return self.gamma_max * (t - a) / (b - a)

    # Module A ----------------------------------------------------------------
    def clean_logits(self, x):
        self.model.eval()
        with torch.no_grad():
            out = self.model(x)
        self.model.train()
        return out

    def scores(self, logits, y, idx=None):
        """Per sample: gap, skewness, ŝ, raw score r and the (EMA'd) score used for ε."""
        rows = []
        for i, row in enumerate(logits.tolist()):
            z = max(row)
            e = [math.exp(v - z) for v in row]
            p = [v / sum(e) for v in e]
            top = sorted(p, reverse=True)
            gap = top[0] - top[1]
            mean = 1 / K
            m2 = sum((pk - mean) ** 2 for pk in p) / K
            m3 = sum((pk - mean) ** 3 for pk in p) / K
            s = 0.0 if m2 < 1e-12 else m3 / m2 ** 1.5
            s_hat = (1 + min(max(s / S_MAX, -1.0), 1.0)) / 2
            r = self.lam * gap + (1 - self.lam) * s_hat
            if self.mu is not None:
                key = int(idx[i])
                if key in self.memory:
                    r = self.mu * self.memory[key] + (1 - self.mu) * r
                self.memory[key] = r
            correct = max(range(K), key=lambda k: p[k]) == int(y[i])  # first max on ties
            rows.append({"gap": gap, "skew": s, "s_hat": s_hat, "score": r, "correct": correct})
        return rows

    def budgets(self, rows):
        eps = []
        for row in rows:
            if row["correct"]:
                eps.append(self.eps_lo + (self.eps_hi - self.eps_lo) * row["score"] ** self.q)
            else:
                eps.append(0.0 if self.misclassified == "clean" else self.eps_hi)
        return eps

    def pgd(self, x, y, eps, alpha, tau, clean, noise):
        """Early-stopped PGD-KL per sample from x + 0.001·z, z the library's draw: one
        (|P|, ...) block of the global generator for the samples with ε_i > 0, in index order."""
        self.model.eval()
        x_adv, steps, stopped = x.clone(), [0] * len(eps), [False] * len(eps)
        j = 0
        for i, e in enumerate(eps):
            if e == 0:
                continue
            x0 = x[i:i + 1]
            lo, hi = (x0 - e).clamp(min=0), (x0 + e).clamp(max=1)
            xa = torch.min(torch.max(x0 + 0.001 * noise[j:j + 1], lo), hi)
            j += 1
            log_p = F.log_softmax(clean[i:i + 1], dim=1)
            counter = tau
            for _ in range(self.k_max):
                xa = xa.detach().requires_grad_(True)
                logits = self.model(xa)
                steps[i] += 1  # this forward/backward is spent whether or not it freezes
                if tau is not None and int(logits.argmax(1)) != int(y[i]):
                    if counter == 0:
                        stopped[i] = True
                        break
                    counter -= 1
                kl = (log_p.exp() * (log_p - F.log_softmax(logits, dim=1))).sum()
                (g,) = torch.autograd.grad(kl, xa)
                xa = torch.min(torch.max(xa.detach() + alpha[i] * g.sign(), lo), hi)
            x_adv[i] = xa.detach()[0]
        self.model.train()
        return x_adv, steps, stopped

    def perturb(self, x, y, epoch, epochs, idx=None, noise_seed=0):
        clean = self.clean_logits(x)
        rows = self.scores(clean, y, idx)
        eps = self.budgets(rows)
        alpha = [self.step_ratio * e for e in eps]
        tau = self.tau(epoch, epochs)
        torch.manual_seed(noise_seed)
        active = sum(e > 0 for e in eps)
        noise = torch.randn((active, *x.shape[1:]), dtype=x.dtype)
        x_adv, steps, stopped = self.pgd(x, y, eps, alpha, tau, clean, noise)
        return {"rows": rows, "eps": eps, "alpha": alpha, "tau": tau, "x_adv": x_adv,
                "steps": steps, "stopped": stopped}

    # Module B ----------------------------------------------------------------
    def clip_mean_one(self, w):
        """The c with mean_i min(c·w_i, ω_max) = 1, by bisection (the fixed point of clipping to
        [0, ω_max] and renormalising to mean 1 over P)."""
        lo, hi = 0.0, self.omega_max / min(w) * 2
        for _ in range(200):
            c = (lo + hi) / 2
            if sum(min(c * wi, self.omega_max) for wi in w) / len(w) < 1:
                lo = c
            else:
                hi = c
        c = (lo + hi) / 2
        return [min(c * wi, self.omega_max) for wi in w]

    def weights(self, v, eps, gamma):
        perturbed = [i for i, e in enumerate(eps) if e > 0]
        vg = [v[i] ** gamma for i in perturbed]
        w = [len(perturbed) * a / sum(vg) for a in vg]
        clipped = self.clip_mean_one(w)
        omega = [1.0] * len(eps)
        for i, value in zip(perturbed, clipped, strict=True):
            omega[i] = value
        return omega, w

    def loss(self, x, y, x_adv, eps, epoch, epochs, seed=1):
        torch.manual_seed(seed)  # the same dropout masks as the library's two forwards
        self.model.train()
        logits, logits_adv = self.model(x), self.model(x_adv)
        log_p, log_q = F.log_softmax(logits, dim=1), F.log_softmax(logits_adv, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(1)
        ce = -log_p.gather(1, y[:, None]).squeeze(1)
        ce_adv = -log_q.gather(1, y[:, None]).squeeze(1)
        d = kl.detach().tolist()
        p_y = log_p.detach().exp().gather(1, y[:, None]).squeeze(1).tolist()
        v = []
        for i in range(len(eps)):
            vi = d[i] / max((eps[i] / self.eps_hi) ** 2, self.eta0)
            if self.mart:
                vi *= 1 - p_y[i]
            v.append(vi)
        gamma = self.gamma(epoch, epochs)
        omega, raw = self.weights(v, eps, gamma)
        om = torch.tensor(omega, dtype=x.dtype)
        loss = ce.mean() + self.beta * (om * kl).mean()
        if self.beta_ce > 0:
            loss = loss + self.beta_ce * (om * ce_adv).mean()
        return {"loss": loss, "omega": omega, "raw": raw, "gamma": gamma, "v": v, "ce": ce.mean(),
                "kl_term": (om * kl).mean(), "ce_adv_term": (om * ce_adv).mean()}


# ----------------------------------------------------------------------------- helpers
def _spy(objective):
    """Record the keyword arguments SRDDAT passes to its attack's perturb."""
    seen = []
    original = objective.attack.perturb

    def perturb(x, y, **kwargs):
        seen.append(kwargs)
        return original(x, y, **kwargs)

    objective.attack.perturb = perturb
    return seen


def _close(got, expected, rel=REL, abs_=1e-9, what=""):
    got = torch.as_tensor(got, dtype=torch.float64).flatten()
    expected = torch.as_tensor(expected, dtype=torch.float64).flatten()
    torch.testing.assert_close(got, expected, rtol=rel, atol=abs_, msg=lambda m: f"{what}: {m}")


def _step(objective, oracle, lib_model, ora_model, x, y, ctx, *, seeds=(11, 12)):
    """One batch through both; every pinned quantity compared. Returns (oracle A, oracle B, out)."""
    seen = _spy(objective)
    torch.manual_seed(seeds[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning per step (e.g. softmax's implicit dim)
        adv = objective.perturb(x, y, ctx)
    a = oracle.perturb(x, y, ctx.epoch, ctx.epochs, ctx.idx, noise_seed=seeds[0])
    assert len(seen) == 1
    call = seen[0]
    # the budgets reach the attack in the input's dtype, with the eval-mode clean logits of
    # Module A's pass (so PGD-KL needs no second clean forward)
    assert call["eps"].dtype == call["alpha"].dtype == x.dtype
    torch.testing.assert_close(call["clean_logits"], oracle.clean_logits(x), rtol=0, atol=1e-8)
    _close(call["eps"], a["eps"], abs_=1e-8, what="eps_i given to the attack")
    _close(call["alpha"], a["alpha"], abs_=1e-8, what="alpha_i given to the attack")
    assert call["tau"] == a["tau"]
    _close(adv.info["eps"], a["eps"], abs_=1e-8, what="info eps")
    _close(adv.info["gap"], [r["gap"] for r in a["rows"]], abs_=3e-7, what="gap")
    _close(adv.info["skew"], [r["skew"] for r in a["rows"]], abs_=3e-6, what="skewness")
    _close(adv.info["score"], [r["score"] for r in a["rows"]], abs_=3e-7, what="score")
    assert adv.info["correct"].tolist() == [r["correct"] for r in a["rows"]]
    torch.testing.assert_close(adv.x_adv, a["x_adv"], rtol=0, atol=ATOL_X)
    assert adv.info["steps_used"].tolist() == a["steps"]
    assert adv.info["stopped"].tolist() == a["stopped"]

    torch.manual_seed(seeds[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = objective.loss(x, y, adv, ctx)
    for key in ("gap", "skew", "score", "kappa"):  # Module A's per-sample values are logged
        torch.testing.assert_close(out.metrics[key], adv.info[key].float(), rtol=0, atol=0)
    b = oracle.loss(x, y, a["x_adv"], a["eps"], ctx.epoch, ctx.epochs, seed=seeds[1])
    _close(out.metrics["eps_i"], a["eps"], abs_=1e-8, what="metrics eps_i")
    _close(out.metrics["omega_i"], b["omega"], what="omega_i")
    _close(out.metrics["gamma_t"], b["gamma"], what="gamma_t")  # a float32 metric
    if a["tau"] is not None:
        assert out.metrics["tau_t"] == a["tau"]
    _close(out.metrics["loss/kl"], b["kl_term"], what="KL term")
    _close(out.metrics["loss/ce_adv"], b["ce_adv_term"], what="adv CE term")
    _close(out.loss, b["loss"], what="loss")
    _close(out.metrics["loss/ce"], b["ce"], what="clean CE")
    omega_p = [w for w, e in zip(b["omega"], a["eps"], strict=True) if e > 0]
    _close(out.metrics["omega_mean"], sum(omega_p) / len(omega_p), what="omega_mean over P")
    _close(out.metrics["omega_max"], max(omega_p), what="omega_max over P")
    _close(out.metrics["omega_min"], min(omega_p), what="omega_min over P")
    _close(out.metrics["steps_per_sample"], sum(a["steps"]) / len(a["steps"]), what="steps")
    _close(out.metrics["frac_perturbed"], sum(e > 0 for e in a["eps"]) / len(a["eps"]))
    _close(out.metrics["eps_mean"], sum(a["eps"]) / len(a["eps"]), abs_=1e-8, what="eps_mean")
    lib_grads = torch.autograd.grad(out.loss, list(lib_model.parameters()))
    ora_grads = torch.autograd.grad(b["loss"], list(ora_model.parameters()))
    scale = max(float(g.abs().max()) for g in ora_grads)  # (the bias before BN gets ~0)
    for name, (g1, g2) in zip([n for n, _ in lib_model.named_parameters()],
                              zip(lib_grads, ora_grads, strict=True), strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6 * scale,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    return a, b, out


def _pair(**hparams):
    lib = _model()
    ora = copy.deepcopy(lib)
    return lib, ora, SRDDAT(lib, **hparams), Oracle(ora, **hparams)


def _assert_batch_exercises(a, b, oracle, *, perturbed_subset=True):
    """The batch is not one where the maths cancels (checked on the oracle's numbers)."""
    rows, eps = a["rows"], a["eps"]
    correct = [r["correct"] for r in rows]
    assert not all(correct) and any(correct), "needs misclassified and correct samples"
    eps_c = [e for e, c in zip(eps, correct, strict=True) if c]
    assert max(eps_c) - min(eps_c) > 0.2 * (oracle.eps_hi - oracle.eps_lo), "budgets differ"
    assert any(r["skew"] < 0 for r in rows), "a sample with the rival mass gathered (s < 0)"
    assert min(r["skew"] for r in rows if r["correct"]) < -0.4 * S_MAX
    ran_all = [s == oracle.k_max and not st
               for s, st, e in zip(a["steps"], a["stopped"], eps, strict=True) if e > 0]
    assert any(a["stopped"]) and any(ran_all), "some freeze early, others run every step"
    assert 0 < b["gamma"] < oracle.gamma_max, "γ strictly inside its ramp"
    if perturbed_subset:
        assert any(e == 0 for e in eps) and any(e > 0 for e in eps)


def _train_mode_matters(oracle, x):
    """Module A on train-mode logits would give other budgets: the eval switch is pinned."""
    twin = copy.deepcopy(oracle.model).train()  # a train-mode pass moves BN's running stats
    with torch.no_grad():
        train_logits = twin(x)
    eval_logits = oracle.clean_logits(x)
    assert (train_logits - eval_logits).abs().max() > 0.5


# ----------------------------------------------------------------------------- tests
def test_default_hyperparameters_against_the_oracle():
    """Every default (eps_lo = 4/255 < eps_hi, q = 1, misclassified="clean", SRD_TAU, γ on its
    ramp); epoch 8 of 20: γ = 1/3, τ = 1."""
    lib, ora, objective, oracle = _pair()
    x, y = _batch()
    _train_mode_matters(oracle, x)
    ctx = TrainContext(epoch=8, epochs=20, idx=torch.arange(N))
    a, b, _ = _step(objective, oracle, lib, ora, x, y, ctx)
    assert a["tau"] == 1
    _assert_batch_exercises(a, b, oracle)


def test_every_term_on_against_the_oracle():
    """q = 2.5, λ = 0.6, step_ratio = 0.3, EMA μ = 0.3 over three visits (shuffled, partly new
    indices), MART factor, beta_ce, γ = 2.4 of 3, a binding clip that needs iterating, the η0
    floor binding, and a τ schedule that ends at 0.5T (epoch 9 of 10: τ = 1)."""
    hp = dict(eps_lo=1 / 255, eps_hi=10 / 255, q=2.5, lambda_gap=0.6, step_ratio=0.3, k_max=6,
              tau_schedule=((0.2, 0), (0.5, 1)), beta=4.0, gamma_max=3.0, gamma_ramp=(0.5, 1.0),
              omega_max=1.6, eta0=1 / 16, score_ema=0.3, mart_factor=True, beta_ce=0.5)
    lib, ora, objective, oracle = _pair(**hp)
    x, y = _batch()
    ctx = TrainContext(epoch=9, epochs=10, idx=torch.arange(100, 100 + N))
    a, b, _ = _step(objective, oracle, lib, ora, x, y, ctx)
    assert a["tau"] == 1
    _assert_batch_exercises(a, b, oracle)
    _assert_weights_exercised(a, b, oracle)

    # second visit: other pixels, rows shuffled, half the indices seen before (memory: r̄)
    perm = torch.tensor([3, 0, 7, 1, 10, 5, 2, 4, 6, 8, 9, 11])
    x2, _ = _batch(seed=5, jitter=0.06, shift=0.02)
    x2, y2 = x2[perm], y[perm]
    idx2 = ctx.idx[perm].clone()
    idx2[6:] += 1000  # never seen: the EMA starts from r itself
    ctx2 = TrainContext(epoch=9, epochs=10, idx=idx2)
    before = dict(oracle.memory)
    a2, _, _ = _step(objective, oracle, lib, ora, x2, y2, ctx2, seeds=(21, 22))
    # the EMA acted: revisited samples' new raw score differs from what memory held
    mu = 0.3
    moved = [abs((r["score"] - mu * before[int(k)]) / (1 - mu) - before[int(k)])
             for r, k in zip(a2["rows"][:6], idx2[:6], strict=True)]
    assert max(moved) > 1e-2
    assert any(r["correct"] for r in a2["rows"][:6])  # a revisited sample's ε uses r̄

    # third visit, original order: memory must have stored r̄ (not the raw r) on the second
    x3, _ = _batch(seed=7, jitter=0.05, shift=0.02)
    idx3 = ctx.idx.clone()
    idx3[::2] += 1000  # a mix of samples seen twice, once (on either visit) and never
    _step(objective, oracle, lib, ora, x3, y, TrainContext(epoch=9, epochs=10, idx=idx3),
          seeds=(31, 32))


def _assert_weights_exercised(a, b, oracle):
    eps = a["eps"]
    perturbed = [e > 0 for e in eps]
    # the η0 floor binds for some perturbed sample and not for another
    ratios = [(e / oracle.eps_hi) ** 2 for e, p in zip(eps, perturbed, strict=True) if p]
    assert min(ratios) < oracle.eta0 < max(ratios)
    # the clip binds, and one clip + one renormalisation is not the fixed point
    raw = b["raw"]
    assert max(raw) > oracle.omega_max
    once = [min(w, oracle.omega_max) for w in raw]
    once = [w * len(once) / sum(once) for w in once]
    assert max(once) > oracle.omega_max + 1e-3
    omega_p = [w for w, p in zip(b["omega"], perturbed, strict=True) if p]
    assert sum(w == pytest.approx(oracle.omega_max) for w in omega_p) >= 2
    assert sum(omega_p) / len(omega_p) == pytest.approx(1, abs=1e-12)


def test_q_half_and_misclassified_uniform_against_the_oracle():
    """q = 0.5 and misclassified="uniform" (every sample perturbed, misclassified at eps_hi);
    epoch 3 of 10 sits exactly on SRD_TAU's first breakpoint (4th epoch <= 0.4·10: τ = 0);
    η0 = 0.3 floors some samples' (ε_i/ε_hi)² where their weight is not clipped."""
    hp = dict(eps_lo=2 / 255, eps_hi=8 / 255, q=0.5, misclassified="uniform",
              gamma_ramp=(0.2, 0.8), gamma_max=2.0, k_max=8, eta0=0.3)
    lib, ora, objective, oracle = _pair(**hp)
    x, y = _batch(seed=3)
    # τ = 1 would give another x̃, so this comparison pins the breakpoint
    tau1 = Oracle(copy.deepcopy(ora), **{**hp, "tau_schedule": 1}).perturb(x, y, 3, 10,
                                                                          noise_seed=11)
    ctx = TrainContext(epoch=3, epochs=10)
    a, b, _ = _step(objective, oracle, lib, ora, x, y, ctx, seeds=(11, 12))
    assert (tau1["x_adv"] - a["x_adv"]).abs().max() > 1e-3
    assert a["tau"] == 0
    _assert_batch_exercises(a, b, oracle, perturbed_subset=False)
    assert all(e == oracle.eps_hi for e, r in zip(a["eps"], a["rows"], strict=True)
               if not r["correct"])
    ratios = [(e / oracle.eps_hi) ** 2 for e in a["eps"]]
    assert any(r > oracle.eta0 for r in ratios)
    assert any(r < oracle.eta0 and w < oracle.omega_max - 1e-6
               for r, w in zip(ratios, b["omega"], strict=True)), "the floor changes a weight"


@pytest.mark.parametrize("hp", [{}, {"tau_schedule": ((0.2, 0), (0.5, 1))},
                                {"tau_schedule": ((50 / 120, 0), (90 / 120, 1), (1.0, 2))},
                                {"gamma_ramp": (0.25, 0.75), "gamma_max": 2.0}])
def test_tau_and_gamma_every_epoch(hp):
    """τ_t given to the attack and γ_t used by the weights at every epoch of short runs."""
    oracle = Oracle(None, **hp)

    class Probe:
        def __init__(self):
            self.taus = []

        def perturb(self, x, y, **kw):
            self.taus.append(kw["tau"])
            n = x.shape[0]
            return AttackResult(x.clone(), {"eps": kw["eps"],
                                            "steps_used": torch.zeros(n, dtype=torch.long)})

    model = _model()
    probe = Probe()
    objective = SRDDAT(model, probe, **hp)
    x, y = _batch()
    for epochs in (10, 12, 7):
        for epoch in range(epochs):
            ctx = TrainContext(epoch=epoch, epochs=epochs)
            adv = objective.perturb(x, y, ctx)
            assert probe.taus[-1] == oracle.tau(epoch, epochs), (epoch, epochs)
            out = objective.loss(x, y, adv, ctx)
            assert float(out.metrics["gamma_t"]) == pytest.approx(
                oracle.gamma(epoch, epochs), rel=1e-6, abs=1e-12), (epoch, epochs)


def test_module_a_at_the_extremes_of_the_skewness():
    """Exactly uniform rows (m2 = 0: s = 0, ŝ = ½, gap 0), one-hot rows (s = s_max, ŝ = 1) and
    the mirrored one-hot (s ≈ -s_max, ŝ ≈ 0), on the class-group term alone (no MLP)."""

    class Groups(nn.Module):
        def forward(self, x):
            return 200.0 * x.flatten(1).view(-1, K, M).mean(2)

    class Probe:
        def perturb(self, x, y, **kw):
            self.kw = kw
            return AttackResult(x.clone(), {"eps": kw["eps"]})

    rows = [[0.5] * K, [0.2] * K, [1.0] + [0.0] * (K - 1), [0.3] * (K - 1) + [0.0],
            [0.31] + [0.3] * (K - 2) + [0.0]]
    x = torch.tensor(rows, dtype=torch.float64)[:, None, :, None].expand(-1, 1, K, M).contiguous()
    y = torch.zeros(len(rows), dtype=torch.long)
    probe = Probe()
    hp = dict(eps_lo=2 / 255, eps_hi=10 / 255, q=1.5, lambda_gap=0.4)
    objective = SRDDAT(Groups().double(), probe, **hp)
    oracle = Oracle(Groups().double(), **hp)
    adv = objective.perturb(x, y, TrainContext())
    expected = oracle.scores(oracle.clean_logits(x), y)
    assert [r["skew"] for r in expected[:2]] == [0.0, 0.0]  # the uniform rule, not 0/0
    assert expected[2]["s_hat"] == pytest.approx(1.0) and expected[3]["s_hat"] < 1e-6
    assert all(r["correct"] for r in expected)  # argmax of a tie is the first class
    _close(adv.info["skew"], [r["skew"] for r in expected], abs_=3e-6, what="skewness")
    _close(adv.info["score"], [r["score"] for r in expected], abs_=3e-7, what="score")
    _close(probe.kw["eps"], oracle.budgets(expected), abs_=1e-8, what="eps")


def test_an_attack_without_eps_in_its_info_gets_the_budgets_recorded():
    """Any attack with the documented ``perturb(x, y, eps=, alpha=, tau=, clean_logits=)`` will
    do: perturb records the budgets in the result itself, and loss accepts it."""

    class Bare:
        def perturb(self, x, y, **kw):
            return AttackResult(x.clone(), {})

    hp = dict(eps_lo=2 / 255, eps_hi=10 / 255)
    model = _model()
    objective = SRDDAT(model, Bare(), **hp)
    oracle = Oracle(copy.deepcopy(model), **hp)
    x, y = _batch()
    adv = objective.perturb(x, y, TrainContext())
    expected = oracle.budgets(oracle.scores(oracle.clean_logits(x), y))
    _close(adv.info["eps"], expected, abs_=1e-8, what="eps recorded by perturb")
    out = objective.loss(x, y, adv, TrainContext())
    _close(out.metrics["eps_i"], expected, abs_=1e-8, what="metrics eps_i")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_metric_on_the_inputs_device(device):
    """With the score memory fed CPU indices (as a loader yields them) and a batch where no sample
    is perturbed (P empty), every tensor SRD-DAT computes or logs stays on the inputs' device."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _model().to(device)
    objective = SRDDAT(model, k_max=2, score_ema=True)
    x, y = _batch()
    x = x.to(device)
    with torch.no_grad():
        wrong = (model.eval()(x).argmax(1).cpu() + 1) % K  # misclassified="clean": P empty
    model.train()
    for labels in (y.to(device), wrong.to(device)):
        for _ in range(2):  # the second visit reads the memory
            ctx = TrainContext(epoch=5, epochs=10, idx=torch.arange(N))
            out = objective(x, labels, ctx)
            assert out.loss.device.type == device
            for key, value in out.metrics.items():
                assert value.device.type == device, key
    assert float(out.metrics["frac_perturbed"]) == 0.0
    assert float(out.metrics["omega_mean"]) == float(out.metrics["omega_max"]) == 1.0
