"""Evaluation state that cannot wedge or lie (issue 10 §1): torn or malformed state files cost
only the work they held; the fingerprint sees the weights and the images; failed writes are one
OutputError naming the file, with what was written intact (robustkit.evaluation.state, runner,
robustkit.attacks.autoattack)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import pytest
import torch
from torch import nn

from robustkit.attacks import AutoAttack
from robustkit.attacks.base import Attack
from robustkit.attacks.pgd import PGD
from robustkit.data.dataset import ImageDataset
from robustkit.errors import OutputError
from robustkit.evaluation import StateMismatchError, evaluate_attacks
from robustkit.testing import (
    HalfMaskedLinear,
    TinyCNN,
    random_batch,
    shrink_autoattack,
)

pyautoattack = pytest.importorskip("pyautoattack")
from pyautoattack import AutoAttack as Backend  # noqa: E402  (after the importorskip)


class Counting(Attack):
    """PGD (3 steps, seeded by the runner through its generator) counting its calls."""

    def __init__(self, model):
        super().__init__(model, eps=0.05)
        self.inner = PGD(model, eps=0.05, alpha=0.02, steps=3, generator=torch.Generator())
        self.generator = self.inner.generator
        self.calls = 0

    def _perturb(self, x, y):
        self.calls += 1
        return self.inner.perturb(x, y)


class Interrupted(Exception):
    """A crash inside an attack (not KeyboardInterrupt, which would stop pytest itself)."""


def _setup():
    model = HalfMaskedLinear().eval()
    x, _ = random_batch(24, (3, 8, 8), seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _attacks(model):
    return {"pgd": Counting(model), "autoattack": AutoAttack(model, eps=0.05)}


def _flags(res):
    out = {"clean": res.clean.tolist(), **{k: v.tolist() for k, v in res.correct.items()}}
    out.update({f"aa/{k}": v.tolist() for k, v in res.components["autoattack"].items()})
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The reference flags, and a state folder interrupted in AutoAttack's chunk 1 during its
    third sub-attack (chunk 0 and the PGD pass finished)."""
    build, run = AutoAttack.build, Backend.run_standard_evaluation
    mp = pytest.MonkeyPatch()
    mp.setattr(AutoAttack, "build", lambda self, device: shrink_autoattack(build(self, device)))
    torch.set_num_threads(1)
    model, x, y = _setup()
    full = _flags(evaluate_attacks(model, (x, y), _attacks(model), batch_size=8))
    calls = []

    def crash(self, *a, **kw):
        calls.append(1)
        if len(calls) == 7:  # chunk 0: 4 sub-attacks; chunk 1: apgd-ce, apgd-t, then fab-t
            raise Interrupted
        return run(self, *a, **kw)

    mp.setattr(Backend, "run_standard_evaluation", crash)
    folder = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(Interrupted):
        evaluate_attacks(model, (x, y), _attacks(model), batch_size=8, state_dir=folder)
    mp.undo()
    assert json.loads((folder / "aastate_autoattack_00001.json").read_text())[
        "_run_attacks"] == ["apgd-ce", "apgd-t"]
    yield full, folder


@pytest.fixture
def resume(interrupted, tmp_path, monkeypatch):
    """A copy of the interrupted folder and a resume that records which sub-attacks ran."""
    full, folder = interrupted
    state = tmp_path / "state"
    shutil.copytree(folder, state)
    build, run = AutoAttack.build, Backend.run_standard_evaluation
    monkeypatch.setattr(AutoAttack, "build",
                        lambda self, device: shrink_autoattack(build(self, device)))
    ran = []

    def spy(self, *a, **kw):
        ran.append(list(self.attacks_to_run)[0])
        # pyautoattack's own state writer (a plain open("w")) is never given a file
        assert kw.get("state_path") is None
        return run(self, *a, **kw)

    monkeypatch.setattr(Backend, "run_standard_evaluation", spy)

    def go():
        model, x, y = _setup()
        attacks = _attacks(model)
        res = evaluate_attacks(model, (x, y), attacks, batch_size=8, state_dir=state)
        return _flags(res), attacks["pgd"].calls, ran

    return full, state, go


def test_clean_resume_keeps_sub_attacks_finished_within_a_chunk(resume):
    full, state, go = resume
    flags, pgd_calls, ran = go()
    assert flags == full
    assert pgd_calls == 0  # the PGD pass is restored
    # chunk 1 resumes at fab-t (apgd-ce and apgd-t finished there); chunk 2 runs from the start
    assert ran[:2] == ["fab-t", "square"] and ran.count("apgd-ce") == 1


def _batches(path):
    return json.loads(path.read_text())["batches"]


@pytest.mark.parametrize("content", [
    b"", b'{"_attacks_to_run": ["apgd-ce", "apgd-t", "fab-t", "square"], "_run_at',
    b"{", b"[]", b"\xff\xfe", "truncated_record", "missing_keys", "done_out_of_order",
], ids=["empty", "half", "brace", "list", "binary", "truncated_record", "missing_keys",
        "out_of_order"])
def test_torn_autoattack_chunk_state_redoes_that_chunk_only(resume, content, caplog):
    full, state, go = resume
    path = state / "aastate_autoattack_00001.json"
    if isinstance(content, str):
        d = json.loads(path.read_text())
        if content == "truncated_record":
            d["broken_by"] = d["broken_by"][:3]
        elif content == "missing_keys":
            d = {"_attacks_to_run": d["_attacks_to_run"]}
        else:
            d["_run_attacks"] = ["apgd-t"]
        content = json.dumps(d).encode()
    path.write_bytes(content)
    others = {f.name: f.read_text() for f in state.glob("flags_*.json")}
    chunk0 = json.loads(others["flags_autoattack.json"])["batches"]["0"]
    with caplog.at_level(logging.INFO):  # pyautoattack's own file (no broken_by): info
        flags, pgd_calls, ran = go()
    assert flags == full  # the same flags as an uninterrupted run, no exception
    assert pgd_calls == 0  # another attack's finished batches survive, on disk too
    for name in ("flags_clean.json", "flags_pgd.json"):
        assert (state / name).read_text() == others[name]
    assert _batches(state / "flags_autoattack.json")["0"] == chunk0
    # chunk 0 survives; chunk 1 is redone from its first sub-attack, then chunk 2
    assert ran.count("apgd-ce") == 2 and ran[0] == "apgd-ce"
    assert "aastate_autoattack_00001.json" in caplog.text and "recomputing" in caplog.text
    assert not path.exists()  # the chunk finished and its file went away


@pytest.mark.parametrize("tear", ["empty", "half", "bad_record", "other_points"])
def test_torn_flags_file_recomputes_only_what_it_held(resume, tear, caplog):
    full, state, go = resume
    flags_aa = state / "flags_autoattack.json"
    before = flags_aa.read_text()
    path = state / "flags_pgd.json"
    text = path.read_text()
    if tear == "empty":
        path.write_bytes(b"")
    elif tear == "half":
        path.write_text(text[: len(text) // 2])
    else:
        d = json.loads(text)
        rec = d["batches"]["1"]
        if tear == "bad_record":
            rec["correct"] = rec["correct"][:-1]
        else:  # a well-formed record of other points (a stale cascade): recomputed, not fatal
            rec["idx"] = rec["idx"][::-1]
        path.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING):
        flags, pgd_calls, ran = go()
    assert flags == full
    # 24 clean-correct points in batches of 8: every PGD batch, or only the malformed one
    assert pgd_calls == (3 if tear in ("empty", "half") else 1)
    assert ran[:2] == ["fab-t", "square"]  # AutoAttack's state was left alone
    assert json.loads(flags_aa.read_text())["batches"]["0"] == json.loads(before)["batches"]["0"]
    assert "flags_pgd.json" in caplog.text or "covers other points" in caplog.text


def test_torn_fingerprint_recomputes_everything(resume, caplog):
    full, state, go = resume
    (state / "fingerprint.json").write_text('{"state_version": 3, "n"')
    with caplog.at_level(logging.WARNING):
        flags, pgd_calls, ran = go()
    assert flags == full and pgd_calls == 3 and ran.count("apgd-ce") == 3
    assert "fingerprint.json" in caplog.text


def test_stale_temporary_files_are_removed(resume):
    _, state, go = resume
    stale = [state / ".flags_pgd.json.abc123.tmp", state / ".fingerprint.json.x.tmp"]
    for f in stale:
        f.write_bytes(b"half a write")
    go()
    assert not any(f.exists() for f in stale)
    assert not list(state.glob(".*.tmp"))


# ----------------------------------------------------------------------- fingerprints


def _tiny():
    torch.manual_seed(0)
    model = TinyCNN(3, 10, 8).eval()
    x, _ = random_batch(16, (3, 8, 8), 10, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 10
    return model, x, y


def _pgd(model):
    return {"pgd": PGD(model, eps=0.03, alpha=0.01, steps=3, generator=torch.Generator())}


@pytest.mark.parametrize("edit", ["parameter", "buffer"])
def test_edited_weights_are_not_resumed(tmp_path, edit):
    """The issue's case: the same names, edited weights, 87.5 % reported instead of 28.1 %."""
    model, x, y = _tiny()
    evaluate_attacks(model, (x, y), _pgd(model), batch_size=8, state_dir=tmp_path)
    with torch.no_grad():
        if edit == "parameter":
            model.fc.weight.mul_(-1)
        else:  # BatchNorm statistics are weights too: they change every prediction
            model.features[1].running_mean.add_(0.5)
    with pytest.raises(StateMismatchError, match=r"model_sha256: \"[0-9a-f]{10}"):
        evaluate_attacks(model, (x, y), _pgd(model), batch_size=8, state_dir=tmp_path)
    again = evaluate_attacks(model, (x, y), _pgd(model), batch_size=8, state_dir=tmp_path,
                             overwrite=True)
    fresh = evaluate_attacks(model, (x, y), _pgd(model), batch_size=8)
    assert again.accuracy() == fresh.accuracy()
    assert torch.equal(again.clean, fresh.clean) and torch.equal(again.robust, fresh.robust)


def test_the_model_hash_covers_names_and_is_stable(tmp_path):
    model, x, y = _tiny()
    evaluate_attacks(model, (x, y), {}, state_dir=tmp_path)
    # an equal copy (another object, same tensors) resumes; a wrapper is unwrapped
    copy = TinyCNN(3, 10, 8).eval()
    copy.load_state_dict(model.state_dict())
    evaluate_attacks(nn.DataParallel(copy), (x, y), {}, state_dir=tmp_path)
    # the same tensors under other names are another model
    swapped = TinyCNN(3, 10, 8).eval()
    swapped.load_state_dict(model.state_dict())
    with torch.no_grad():  # two biases of equal shape exchanged
        swapped.features[0].bias.copy_(model.features[1].bias)
        swapped.features[1].bias.copy_(model.features[0].bias)
    with pytest.raises(StateMismatchError, match="model_sha256"):
        evaluate_attacks(swapped, (x, y), {}, state_dir=tmp_path)


@pytest.mark.parametrize("change", ["inverted", "one_pixel", "labels"])
def test_other_images_or_labels_are_not_resumed(tmp_path, change):
    """The issue's case: --data-root at inverted images reported 87.5 % (fresh: 0 %)."""
    model, x, y = _tiny()
    evaluate_attacks(model, (x, y), _pgd(model), batch_size=8, state_dir=tmp_path)
    x2, y2 = x.clone(), y.clone()
    if change == "inverted":
        x2 = 1 - x
    elif change == "one_pixel":
        x2[5, 1, 2, 3] += 1e-3
    else:
        y2[0] = (y2[0] + 1) % 10
    with pytest.raises(StateMismatchError, match="data_sha256"):
        evaluate_attacks(model, (x2, y2), _pgd(model), batch_size=8, state_dir=tmp_path)


def test_image_dataset_fast_path_hashes_the_stored_images(tmp_path):
    model, _, _ = _tiny()
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (12,), generator=g)
    evaluate_attacks(model, ImageDataset(raw, labels), {}, batch_size=4, state_dir=tmp_path)
    evaluate_attacks(model, ImageDataset(raw.clone(), labels), {}, batch_size=4,
                     state_dir=tmp_path)  # equal content resumes
    raw[7, 0, 0, 0] ^= 1
    with pytest.raises(StateMismatchError, match="data_sha256"):
        evaluate_attacks(model, ImageDataset(raw, labels), {}, batch_size=4, state_dir=tmp_path)
    # any other dataset is read once as the runner sees it
    ds = torch.utils.data.TensorDataset(raw.float() / 255, labels)
    evaluate_attacks(model, ds, {}, batch_size=4, state_dir=tmp_path / "other")
    ds2 = torch.utils.data.TensorDataset(1 - raw.float() / 255, labels)
    with pytest.raises(StateMismatchError, match="data_sha256"):
        evaluate_attacks(model, ds2, {}, batch_size=4, state_dir=tmp_path / "other")


# ----------------------------------------------------------------------- failed writes


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_full_disk_while_writing_state_is_one_output_error(tmp_path, monkeypatch,
                                                           failing_replace, code):
    model, x, y = _tiny()
    failing_replace(code, "flags_pgd.json", after=1)
    with pytest.raises(OutputError, match=rf"flags_pgd\.json: {os.strerror(code)}") as err:
        evaluate_attacks(model, (x, y), {"pgd": Counting(model)}, batch_size=4,
                         state_dir=tmp_path)
    assert "\n" not in str(err.value) and errno.errorcode[code] in str(err.value)
    monkeypatch.undo()
    saved = json.loads((tmp_path / "flags_pgd.json").read_text())  # intact: batch 0 only
    assert list(saved["batches"]) == ["0"]
    assert not list(tmp_path.glob(".*.tmp"))  # the failed write left no temporary file
    counting = Counting(model)
    res = evaluate_attacks(model, (x, y), {"pgd": counting}, batch_size=4, state_dir=tmp_path)
    n_batches = -(-int(res.clean.sum()) // 4)
    assert n_batches >= 3 and counting.calls == n_batches - 1  # resumed after the saved batch
    fresh = evaluate_attacks(model, (x, y), {"pgd": Counting(model)}, batch_size=4)
    assert torch.equal(res.correct["pgd"], fresh.correct["pgd"])


def test_full_disk_while_writing_an_autoattack_chunk(tmp_path, monkeypatch, failing_replace):
    model, x, y = _tiny()
    aa = {"aa": AutoAttack(model, eps=0.03, version="custom", attacks=["apgd-ce"])}
    failing_replace(errno.ENOSPC, "aastate_aa_00001.json")
    with pytest.raises(OutputError, match=r"aastate_aa_00001\.json: No space left"):
        evaluate_attacks(model, (x, y), aa, batch_size=4, state_dir=tmp_path)
    monkeypatch.undo()
    assert list(json.loads((tmp_path / "flags_aa.json").read_text())["batches"]) == ["0"]


def test_discard_state_removes_every_rank_folder(tmp_path):
    from robustkit.evaluation.state import discard_state

    model, x, y = _tiny()
    evaluate_attacks(model, (x, y), {}, state_dir=tmp_path)
    for sub in ("rank1-of2", "rank0-of4"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "flags_clean.json").write_text("{}")
    (tmp_path / "keep.txt").write_text("not state")
    # under torchrun rank 0 leaves the current world's folders to their own ranks
    assert discard_state(tmp_path, keep_world=2) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "rank1-of2"]
    assert discard_state(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
