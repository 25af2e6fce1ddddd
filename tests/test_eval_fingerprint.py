"""Every setting that changes a flag or a recorded number is in the resume fingerprint (issue 18
§3; robustkit.evaluation.state, protocol, cli.evaluate): ONE test per field, each resuming with
only that field changed, which must be refused (``StateMismatchError`` naming the field; one
line and exit 2 from the CLI) or start afresh in its own folder, never mix results.

Fields, from ``evaluate_attacks``: state_version, n, batch_size, protocol, seed, norm,
world_size, versions (robustkit, torch), attacks (class and ``settings()``), model_sha256,
data_sha256, plus the caller's ``fingerprint``; from ``robustkit evaluate``: model (spec),
model_code_sha256 (FILE.py of FILE.py:FN), checkpoint_sha256, dataset, data_root, threat_model,
eps, attack_settings (the attacks as built: steps, restarts, AutoAttack version and sub-attacks,
the backends' versions). Not in it, on purpose: --name, --device, --out, progress bars.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from robustkit.attacks.fgsm import FGSM
from robustkit.attacks.pgd import PGD
from robustkit.cli import main
from robustkit.data import load_dataset
from robustkit.evaluation import StateMismatchError, evaluate_attacks
from robustkit.testing import LinearModel, random_batch

# ---- the library: evaluate_attacks -----------------------------------------------------------


def _setup():
    torch.manual_seed(0)
    model = LinearModel((3, 8, 8), 10).eval()
    x, _ = random_batch(8, (3, 8, 8), 10, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point clean-correct: the attack does work
    return model, x, y


def _base(model, x, y):
    return dict(model=model, data=(x, y), batch_size=4, protocol="standalone", seed=0,
                norm="Linf", fingerprint={"eps": 0.03},
                attacks={"pgd": PGD(model, eps=0.03, alpha=0.01, steps=2)})


def _nudged(model):
    other = LinearModel((3, 8, 8), 10).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.fc.weight[0, 0] += 1e-3
    return other


def _more_points(x, y):
    return torch.cat([x, x[:1]]), torch.cat([y, y[:1]])


def _one_pixel(x, y):
    x = x.clone()
    x[0, 0, 0, 0] = 1 - x[0, 0, 0, 0]
    return x, y


# field -> how the second run differs (a function of the first run's keyword arguments)
LIBRARY_FIELDS = {
    "model_sha256": lambda kw: {**kw, "model": _nudged(kw["model"])},
    "data_sha256": lambda kw: {**kw, "data": _one_pixel(*kw["data"])},
    "n": lambda kw: {**kw, "data": _more_points(*kw["data"])},
    "batch_size": lambda kw: {**kw, "batch_size": 3},
    "protocol": lambda kw: {**kw, "protocol": "cascade"},
    "seed": lambda kw: {**kw, "seed": 1},
    "norm": lambda kw: {**kw, "norm": "L2"},
    "attacks.pgd.eps": lambda kw: {**kw, "attacks": {
        "pgd": PGD(kw["model"], eps=0.04, alpha=0.01, steps=2)}},
    "attacks.pgd.steps": lambda kw: {**kw, "attacks": {
        "pgd": PGD(kw["model"], eps=0.03, alpha=0.01, steps=3)}},
    "attacks.pgd.class": lambda kw: {**kw, "attacks": {"pgd": FGSM(kw["model"], eps=0.03)}},
    "attacks.pgd2": lambda kw: {**kw, "attacks": {
        **kw["attacks"], "pgd2": PGD(kw["model"], eps=0.03, alpha=0.01, steps=2)}},
    "eps": lambda kw: {**kw, "fingerprint": {"eps": 0.04}},  # what the caller adds
}


@pytest.mark.parametrize("field", list(LIBRARY_FIELDS))
def test_library_field_refused(tmp_path, field):
    model, x, y = _setup()
    first = _base(model, x, y)
    evaluate_attacks(**first, state_dir=tmp_path)
    second = LIBRARY_FIELDS[field](first)
    with pytest.raises(StateMismatchError, match=rf"differs in: (.*; )?{field}[.:]"):
        evaluate_attacks(**second, state_dir=tmp_path)
    # ... and the overwrite starts afresh: the numbers of an uninterrupted run with `second`
    again = evaluate_attacks(**second, state_dir=tmp_path, overwrite=True)
    fresh = evaluate_attacks(**second)
    assert all(torch.equal(again.correct[k], fresh.correct[k]) for k in fresh.correct)
    assert again.max_perturbation == pytest.approx(fresh.max_perturbation, rel=1e-6)


def test_norm_mixed_the_perturbation_size(tmp_path):
    """The issue's shape for ``norm``: resumed in L2, max_perturbation was the L∞ one (0.03
    against a fresh 0.35), so the perturbation check compared an L∞ size with an L2 budget."""
    model, x, y = _setup()
    kw = _base(model, x, y)
    evaluate_attacks(**kw, state_dir=tmp_path)
    with pytest.raises(StateMismatchError, match='norm: "Linf" -> "L2"'):
        evaluate_attacks(**{**kw, "norm": "L2"}, state_dir=tmp_path)


def test_state_version_refused(tmp_path, monkeypatch):
    from robustkit.evaluation import state

    model, x, y = _setup()
    kw = _base(model, x, y)
    evaluate_attacks(**kw, state_dir=tmp_path)
    monkeypatch.setattr(state, "STATE_VERSION", state.STATE_VERSION + 1)
    with pytest.raises(StateMismatchError, match="state_version"):
        evaluate_attacks(**kw, state_dir=tmp_path)


@pytest.mark.parametrize("package", ["robustkit", "torch"])
def test_versions_refused(tmp_path, monkeypatch, package):
    from robustkit.evaluation import protocol

    model, x, y = _setup()
    kw = _base(model, x, y)
    evaluate_attacks(**kw, state_dir=tmp_path)
    real = protocol._versions()
    monkeypatch.setattr(protocol, "_versions", lambda: {**real, package: "99.0"})
    with pytest.raises(StateMismatchError, match=rf"versions\.{package}: "):
        evaluate_attacks(**kw, state_dir=tmp_path)


def test_world_size_starts_afresh_in_its_own_folder(tmp_path, monkeypatch):
    """Two processes (simulated: rank 0 of 2) keep ``state/rank0-of2``; the single-process
    state beside it is neither read nor touched."""
    from robustkit import distributed as dist

    model, x, y = _setup()
    kw = _base(model, x, y)
    evaluate_attacks(**kw, state_dir=tmp_path, shard=True)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.json")}
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [obj, obj])
    evaluate_attacks(**kw, state_dir=tmp_path, shard=True)
    fp = json.loads((tmp_path / "rank0-of2" / "fingerprint.json").read_text())
    assert fp["world_size"] == 2
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.json")} == before


def test_fingerprint_records_the_versions(tmp_path):
    import robustkit

    model, x, y = _setup()
    evaluate_attacks(**_base(model, x, y), state_dir=tmp_path)
    fp = json.loads((tmp_path / "fingerprint.json").read_text())
    assert fp["versions"] == {"robustkit": robustkit.__version__, "torch": torch.__version__}


def test_a_rank_without_shard_evaluates_alone(tmp_path, monkeypatch):
    """In a process group (simulated: rank 0 of 2) shard=False, the default, is a plain
    single-process run: every batch here, the state in state_dir itself, nothing gathered."""
    from robustkit import distributed as dist

    model, x, y = _setup()
    kw = _base(model, x, y)
    fresh = evaluate_attacks(**kw)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)

    def no_gather(obj):
        raise AssertionError("a run without shard gathers nothing")

    monkeypatch.setattr(dist, "all_gather_object", no_gather)
    got = evaluate_attacks(**kw, state_dir=tmp_path)
    assert json.loads((tmp_path / "fingerprint.json").read_text())["world_size"] == 1
    assert not (tmp_path / "rank0-of2").exists()
    assert all(torch.equal(got.correct[k], fresh.correct[k]) for k in fresh.correct)


def _two_ranks(monkeypatch, gather):
    """Simulated: this process is rank 0 of 2; ``gather(obj)`` plays all_gather_object."""
    from robustkit import distributed as dist

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "all_gather_object", gather)


def test_ranks_share_a_state_failure(tmp_path, monkeypatch):
    """A rank whose state folder is refused tells the others, which stop too (none waits
    forever at the next gather); its own error is raised as it is."""
    model, x, y = _setup()
    kw = _base(model, x, y)
    sent = []

    def rank1_refused(obj):
        sent.append(obj)
        return [obj, ("StateMismatchError", "rank 1's state differs")]

    _two_ranks(monkeypatch, rank1_refused)
    with pytest.raises(StateMismatchError, match="rank 1: rank 1's state differs"):
        evaluate_attacks(**kw, state_dir=tmp_path / "a", shard=True)
    assert sent == [None]  # this rank had no failure to report

    _two_ranks(monkeypatch, lambda obj: [obj, obj])
    evaluate_attacks(**kw, state_dir=tmp_path / "b", shard=True)
    sent.clear()
    _two_ranks(monkeypatch, lambda obj: sent.append(obj) or [obj, None])
    with pytest.raises(StateMismatchError, match="holds an evaluation with other settings"):
        evaluate_attacks(**{**kw, "seed": 1}, state_dir=tmp_path / "b", shard=True)
    assert len(sent) == 1 and sent[0][0] == "StateMismatchError" and "seed" in sent[0][1]


def test_a_sharded_rank_evaluates_only_its_batches(monkeypatch):
    """Rank 0 of 2 with 8 points in batches of 4: its model sees the first batch only."""
    model, x, y = _setup()
    seen = []
    model.register_forward_hook(lambda m, inp, out: seen.append(len(inp[0])))
    _two_ranks(monkeypatch, lambda obj: [obj, obj])
    evaluate_attacks(model, (x, y), {}, batch_size=4, shard=True)
    assert sum(seen) == 4


def test_cascade_attack_order_is_never_mixed(tmp_path):
    """Under the cascade the order of the attacks changes which points each sees; a resume in
    another order may reuse only batches covering the same points (which give the same flags)."""
    model, x, y = _setup()
    kw = _base(model, x, y)
    weak, strong = (PGD(model, eps=e, alpha=e / 2, steps=2) for e in (0.01, 0.05))
    a = {**kw, "protocol": "cascade", "attacks": {"weak": weak, "strong": strong}}
    b = {**a, "attacks": {"strong": strong, "weak": weak}}
    evaluate_attacks(**a, state_dir=tmp_path)
    resumed = evaluate_attacks(**b, state_dir=tmp_path)
    fresh = evaluate_attacks(**b)
    assert all(torch.equal(resumed.correct[k], fresh.correct[k]) for k in fresh.correct)


# ---- the CLI: robustkit evaluate -------------------------------------------------------------

FACTORY = """
import torch
from torch import nn
from robustkit.data import load_dataset

def net():
    # nearest class mean of the shipped MNIST sample: 3 of the first 4 test images correct,
    # so PGD has points to attack and records to resume
    train = load_dataset("sample-mnist", "train")
    x = train.x[:1000].float().div(255).flatten(1)
    y = train.y[:1000]
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    fc = nn.Linear(784, 10)
    with torch.no_grad():
        fc.weight.copy_(2 * means)
        fc.bias.copy_(-(means ** 2).sum(1))
    return nn.Sequential(nn.Flatten(), fc{extra})

net2 = net  # the same model under another name
"""


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "archs.py"
    path.write_text(FACTORY.format(extra=""))
    return path


def _idx(path: Path, array: torch.Tensor) -> None:
    dims = list(array.shape)
    head = bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(head + array.contiguous().numpy().tobytes()))


def _mnist_root(root: Path) -> Path:
    """An MNIST root holding the shipped sample's first 8 test images: the same pixels, labels
    and order as ``sample-mnist``, so only the dataset name and the root differ."""
    test = load_dataset("sample-mnist", "test")
    _idx(root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", test.x[:8, 0])
    _idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", test.y[:8].to(torch.uint8))
    return root


def _checkpoints(tmp_path, factory):
    """Two files with the same weights and different bytes (plain and wrapped state dict)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("archs_ckpt", factory)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sd = mod.net().state_dict()
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(sd, plain)
    torch.save({"state_dict": sd}, wrapped)
    return plain, wrapped


def _run(out, factory, *argv, model="net", dataset="sample-mnist"):
    base = {"--model": f"{factory}:{model}", "--dataset": dataset, "--n-examples": "4",
            "--batch-size": "2", "--attacks": "clean,pgd2", "--eps": "0.1", "--seed": "0",
            "--device": "cpu", "--out": str(out)}
    flags = dict(zip(argv[::2], argv[1::2], strict=True))
    args = [a for k, v in {**base, **flags}.items() for a in (k, v)]
    return main(["evaluate", *args, "--no-progress"])


def _refusal(capsys) -> list[str]:
    """The dotted keys the one-line refusal names (``attack_settings.pgd2.eps``, ...)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an evaluation with other settings" in err[0], err
    differs = err[0].split("differs in: ", 1)[1].rsplit("); use another", 1)[0]
    return [entry.split(": ", 1)[0] for entry in differs.split("; ")]


def _names(keys: list[str], field: str) -> bool:
    return any(k == field or k.startswith(f"{field}.") for k in keys)


# field named in the refusal -> (flags of the first run, flags of the second run)
CLI_FIELDS = {
    "model": ((), ("model", "net2")),
    "dataset": (("dataset", "sample-mnist"), ("dataset", "mnist", "--data-root", "ROOT")),
    "data_root": (("dataset", "mnist", "--data-root", "ROOT"),
                  ("dataset", "mnist", "--data-root", "ROOT2")),
    "threat_model": ((), ("--threat-model", "L2")),
    "eps": ((), ("--eps", "0.2")),
    "attack_settings.pgd3": ((), ("--attacks", "clean,pgd3")),
    "attack_settings.pgd2x2": ((), ("--attacks", "clean,pgd2x2")),
    "attack_settings.autoattack.version": (("--attacks", "clean,autoattack"),
                                           ("--attacks", "clean,autoattack",
                                            "--aa-version", "plus")),
    "attack_settings.autoattack.attacks": (
        ("--attacks", "clean,autoattack", "--aa-version", "custom", "--aa-attacks", "apgd-ce"),
        ("--attacks", "clean,autoattack", "--aa-version", "custom", "--aa-attacks",
         "apgd-ce,square")),
    "seed": ((), ("--seed", "1")),
    "batch_size": ((), ("--batch-size", "1")),
    "n": ((), ("--n-examples", "3")),
    "protocol": ((), ("--protocol", "cascade")),
}


def _argv(flags, roots, factory):
    out, model, dataset = [], "net", "sample-mnist"
    it = iter(flags)
    for k in it:
        v = next(it)
        if k == "model":
            model = v
        elif k == "dataset":
            dataset = v
        else:
            out += [k, str(roots.get(v, v))]
    return out, model, dataset


@pytest.mark.parametrize("field", list(CLI_FIELDS))
def test_cli_field_refused(tmp_path, factory, capsys, field):
    roots = {"ROOT": _mnist_root(tmp_path / "r1"), "ROOT2": _mnist_root(tmp_path / "r2")}
    out = tmp_path / "out"
    first, second = CLI_FIELDS[field]
    argv, model, dataset = _argv(first, roots, factory)
    assert _run(out, factory, *argv, model=model, dataset=dataset) == 0
    argv, model, dataset = _argv(second, roots, factory)
    capsys.readouterr()
    assert _run(out, factory, *argv, model=model, dataset=dataset) == 2
    keys = _refusal(capsys)
    assert _names(keys, field), keys
    if field in ("model", "dataset", "data_root"):  # the same weights and the same pixels
        assert "model_sha256" not in keys and "data_sha256" not in keys


def test_cli_model_code_refused(tmp_path, factory, capsys):
    """The issue's shape for FILE.py:FN: an edited forward pass (here a ReLU on the logits)
    with the same weights was resumed, since the weights' hash cannot see code."""
    out = tmp_path / "out"
    assert _run(out, factory) == 0
    factory.write_text(FACTORY.format(extra=", nn.ReLU()"))
    capsys.readouterr()
    assert _run(out, factory) == 2
    keys = _refusal(capsys)
    assert "model_code_sha256" in keys and "model_sha256" not in keys


def test_cli_checkpoint_refused(tmp_path, factory, capsys):
    plain, wrapped = _checkpoints(tmp_path, factory)
    out = tmp_path / "out"
    assert _run(out, factory, "--checkpoint", str(plain)) == 0
    capsys.readouterr()
    assert _run(out, factory, "--checkpoint", str(wrapped)) == 2
    keys = _refusal(capsys)
    assert "checkpoint_sha256" in keys and "model_sha256" not in keys


@pytest.mark.parametrize("package", ["pyautoattack", "torchattacks"])
def test_cli_backend_version_refused(tmp_path, factory, capsys, monkeypatch, package):
    from robustkit.attacks import specs

    pytest.importorskip(package)
    attack = "autoattack" if package == "pyautoattack" else "torchattacks:FGSM"
    out = tmp_path / "out"
    assert _run(out, factory, "--attacks", f"clean,{attack}") == 0
    real = specs._version
    monkeypatch.setattr(specs, "_version", lambda p: "99.0" if p == package else real(p))
    capsys.readouterr()
    assert _run(out, factory, "--attacks", f"clean,{attack}") == 2
    assert f"attack_settings.{attack}.backend_version" in _refusal(capsys)


def test_cli_name_and_device_are_not_settings(tmp_path, factory):
    """They change no flag: the same run under another --name resumes (nothing recomputed)."""
    out = tmp_path / "out"
    assert _run(out, factory, "--name", "a") == 0
    flags = (out / "state" / "flags_pgd2.json").read_bytes()
    assert json.loads(flags)["batches"]  # there was work to resume
    assert _run(out, factory, "--name", "b", "--device", "cpu") == 0
    assert (out / "state" / "flags_pgd2.json").read_bytes() == flags
