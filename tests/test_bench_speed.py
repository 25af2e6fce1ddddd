"""The issue #21 benchmarks' own logic, cheaply: bench_gpu's skip path and CPU-safe helpers,
bench_speedmap's agreement and bookkeeping, bench_srd_dat's step split and extrapolation.

No timing is asserted here (speed targets live in the benchmarks' JSON, not in unit tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def gpu():
    return _load("bench_gpu")


@pytest.fixture(scope="module")
def speedmap():
    return _load("bench_speedmap")


@pytest.fixture(scope="module")
def srd():
    return _load("bench_srd_dat")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ bench_gpu
def test_gpu_bench_skips_cleanly_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped" in proc.stdout and "no CUDA device" in proc.stdout
    data = json.loads(out.read_text())
    assert data["skipped"] is True and data["bench"] == "gpu"
    assert "CUDA" in data["reason"]
    assert "Traceback" not in proc.stderr


def test_gpu_main_in_process_writes_skipped_json(gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = gpu.main(["--out", str(tmp_path / "g.json")])
    assert result["skipped"] is True
    assert json.loads((tmp_path / "g.json").read_text()) == result
    assert gpu.cuda_status() == (False, "no CUDA device (torch.cuda.is_available() is False)")


def test_gpu_cuda_status_names_an_unusable_device(gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def broken(*args, **kwargs):
        if kwargs.get("device") == "cuda":
            raise RuntimeError("driver too old")
        return torch.empty(0)
    monkeypatch.setattr(torch, "zeros", broken)
    ok, reason = gpu.cuda_status()
    assert not ok and "unusable" in reason and "driver too old" in reason


def test_gpu_lever_settings_and_plan(gpu):
    s = {lever: gpu.lever_settings(lever) for lever in gpu.LEVERS}
    assert s["eager"] == {"channels_last": False, "autocast": None, "compile": None}
    assert s["bf16"]["autocast"] is torch.bfloat16 and not s["bf16"]["channels_last"]
    assert s["channels_last_bf16"] == {"channels_last": True, "autocast": torch.bfloat16,
                                       "compile": None}
    assert s["compile"]["compile"] == "default"
    assert s["compile_reduce_overhead"]["compile"] == "reduce-overhead"  # CUDA graphs
    assert s["compile_max_autotune"]["compile"] == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="unknown lever 'fp8'"):
        gpu.lever_settings("fp8")
    quick, full = gpu.plan(True), gpu.plan(False)
    assert len(full) == len(gpu.MODELS) * len(gpu.WORKLOADS) * len(gpu.LEVERS)
    assert {m for m, _, _ in quick} == set(gpu.QUICK_MODELS) < {m for m, _, _ in full}
    assert {w for _, w, _ in full} == {"pgd10", "pgd_at_step"}
    assert any(m.startswith("resnet18") for m in gpu.QUICK_MODELS)


def test_gpu_agreement_and_ratio_helpers(gpu):
    assert gpu.agrees(1e-5, 9e-5, "compile") and not gpu.agrees(1e-5, 2e-4, "compile")
    assert gpu.agrees(0.05, 0.09, "bf16") and not gpu.agrees(0.05, 0.2, "channels_last_bf16")
    r = gpu.paired_ratios({"eager": [2.0, 4.0, 1.0], "x": [1.0, 1.0, 1.0]})
    assert r == {"eager": 1.0, "x": 0.5}
    assert gpu.rel_diff(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == 0.5
    assert gpu.rel_diff(torch.zeros(2), torch.zeros(2)) == 0.0


def test_gpu_measure_model_runs_the_uncompiled_levers_on_a_cpu(gpu):
    res = gpu.measure_model("smallcnn_b128", 1, torch.device("cpu"),
                            levers=("eager", "bf16"), batch=2)
    assert res["batch"] == 2
    for workload in ("pgd10", "pgd_at_step"):
        w = res["workloads"][workload]
        assert w["eager"]["ratio"] == 1.0 and w["eager"]["logits_rel_diff"] == 0.0
        assert w["bf16"]["dtype"] == "bfloat16"
        assert 0 < w["bf16"]["logits_rel_diff"] < 0.1  # not vacuous: bf16 differs a little
        assert w["bf16"]["input_grad_cosine"] > 0.99
        assert all("error" not in e and e["warmup_seconds"] > 0 for e in w.values())


# ------------------------------------------------------------------ bench_speedmap
def test_speedmap_agreement_is_not_vacuous(speedmap):
    model = speedmap.make_model("small_cnn", "sample-mnist")
    x, y = speedmap.batch("sample-mnist", 8)
    z, g = speedmap.logits_and_grad(model.eval(), x, y)
    assert float(z.abs().max()) > 0 and float(g.abs().max()) > 0
    ag = speedmap.agreement("pgd10_smallcnn", model, x, y, "channels_last")
    assert ag["agree"] and ag["logits_rel_diff"] < 1e-4
    assert 0.0 <= ag["pgd_iterate_equal_fraction"] <= 1.0


def test_speedmap_variants(speedmap):
    model = speedmap.make_model("small_cnn", "sample-mnist")
    cl = speedmap.variant_model(model, "channels_last")
    convs = [m for m in cl.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last)
                         for c in convs if c.weight.shape[1] > 1)
    assert speedmap.variant_model(model, "eager") is not model  # a copy, the original untouched
    x = torch.rand(2, 3, 8, 8)
    assert speedmap.variant_input(x, "channels_last").is_contiguous(
        memory_format=torch.channels_last)
    assert speedmap.variant_input(x, "compile") is x
    assert speedmap.rel_diff(torch.tensor([3.0]), torch.tensor([2.0])) == 0.5


def test_speedmap_run_workload_and_table(speedmap, monkeypatch):
    monkeypatch.setattr(speedmap, "VARIANTS", ("eager", "channels_last"))
    monkeypatch.setitem(speedmap.WORKLOADS, "pgd_at_step_smallcnn",
                        ("small_cnn", "sample-mnist", 2, 0.3, 0.075, "train"))
    res = speedmap.run_workload("pgd_at_step_smallcnn", repeats=2)
    v = res["variants"]
    assert set(v) == {"eager", "channels_last"} and res["clock"] == "cpu"
    assert v["eager"]["ratio"] == 1.0 and len(v["channels_last"]["cpu_seconds"]) == 2
    result = {"runs": [{"threads": 1, "load_average_start": 0.5,
                        "workloads": {"pgd_at_step_smallcnn": res}}]}
    lines = speedmap.table(result)
    assert len(lines) == 3 and "channels_last" in lines[2] and "yes" in lines[2]
    best = speedmap.summarise(result)
    assert best["pgd_at_step_smallcnn@1"]["fastest"] in ("eager", "channels_last")


def test_speedmap_failing_variant_is_recorded_not_raised(speedmap, monkeypatch):
    monkeypatch.setattr(speedmap, "VARIANTS", ("eager", "broken"))
    monkeypatch.setitem(speedmap.WORKLOADS, "pgd10_smallcnn",
                        ("small_cnn", "sample-mnist", 2, 0.3, 0.075, "attack"))
    real = speedmap.variant_model

    def variant_model(model, variant):
        if variant == "broken":
            raise RuntimeError("inductor: no C++ compiler\nlong log")
        return real(model, variant)
    monkeypatch.setattr(speedmap, "variant_model", variant_model)
    res = speedmap.run_workload("pgd10_smallcnn", repeats=1)
    assert res["variants"]["broken"] == {"error": "RuntimeError: inductor: no C++ compiler"}
    assert res["variants"]["eager"]["ratio"] == 1.0


# ------------------------------------------------------------------ bench_srd_dat
def test_srd_stepper_splits_a_step_and_counts_real_steps(srd):
    from robustkit.objectives import TrainContext

    model = srd.fresh_model()
    x = torch.rand(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    parts = {}
    for name in ("trades", "srd_dat"):
        parts[name] = srd.Stepper(name, model).step(x, y, TrainContext(epoch=0, epochs=10))
    t, s = parts["trades"], parts["srd_dat"]
    assert t["steps_per_sample"] == srd.K and t["frac_attacked"] == 1.0
    assert t["module_a"] < 0.05 * t["total"]  # TRADES has no Module A: perturb = its attack
    # a fresh SmallCNN (zero last layer) calls every sample class 0: only y == 0 is attacked
    assert s["frac_attacked"] == float((y == 0).float().mean())
    assert s["steps_per_sample"] <= srd.K * s["frac_attacked"]
    for p in (t, s):
        assert abs(p["module_a"] + p["attack"] + p["loss"] + p["backward"] - p["total"]) < 1e-6


def test_srd_extrapolation_weights_the_phases(srd):
    rows = {p: {"srd_dat": {"total": 1.0 * (i + 1), "steps_per_sample_mean": 10.0 * (i + 1)},
                "trades": {"total": 2.0}} for i, p in enumerate(srd.PHASES)}
    out = srd.extrapolate(rows)
    shares = [v[1] for v in srd.PHASES.values()]
    assert abs(sum(shares) - 1.0) < 1e-12
    assert out["ratio"] == pytest.approx((0.40 * 1 + 0.35 * 2 + 0.25 * 3) / 2.0)
    assert out["srd_steps_per_sample"] == pytest.approx(10 * (0.40 + 0.70 + 0.75))


def test_srd_phases_put_the_schedule_in_each_tau(srd):
    from robustkit.objectives.schedules import tau_schedule

    taus = [tau_schedule(e, n, srd.SRD["tau_schedule"]) for (e, n), _ in srd.PHASES.values()]
    assert taus == [0, 1, 2]
