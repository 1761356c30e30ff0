"""The benchmark runner and the GPU check script work end to end (the GPU run itself needs a GPU)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from bench import bench_vs_nanochat
from bench.__main__ import verdict
from tests.conftest import PYTHON, ROOT


def test_verdict_reads_ratios_of_tokens_as_lower_bounds_and_the_rest_as_upper_bounds():
    assert verdict({"name": "tokens_per_sec_ratio", "median": 0.995, "target": 0.99}) == "pass"
    assert verdict({"name": "tokens_per_sec_ratio", "median": 0.95, "target": 0.99}) == "FAIL"
    assert verdict({"name": "restart_latency", "median": 0.4, "target": 1.0}) == "pass"
    assert verdict({"name": "status", "median": 0.5, "target": 0.3}) == "FAIL"
    assert verdict({"name": "trainer_tokens_per_sec_cpu", "median": 9000, "target": None}) == "info"
    assert verdict({"name": "vs_nanochat_tokens_per_sec_ratio", "median": 1.2, "target": 1.0}) == "pass"
    assert verdict({"name": "vs_nanochat_tokens_per_sec_ratio", "median": 0.8, "target": 1.0}) == "FAIL"
    assert verdict({"name": "vs_nanochat_tokens_per_sec_ratio", "median": None, "target": 1.0, "skipped": "no nanochat"}) \
        == "skipped"


def figures_of(stdout: str) -> dict:
    return {f["name"]: f for f in map(json.loads, (ln for ln in stdout.splitlines() if ln.startswith("{")))}


def test_the_nanochat_comparison_without_nanochat_reports_its_figure_skipped_with_the_reason(tmp_path):
    env = {**os.environ, "NANOCHAT_SRC": str(tmp_path / "nowhere")}
    r = subprocess.run([PYTHON, "-m", "bench.bench_vs_nanochat", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    fig = figures_of(r.stdout)["vs_nanochat_tokens_per_sec_ratio"]
    assert fig["median"] is None and str(tmp_path / "nowhere") in fig["skipped"]


def test_the_chat_bench_smoke_reports_cached_and_uncached_tokens_per_second_and_their_ratio():
    r = subprocess.run([PYTHON, "-m", "bench.bench_chat", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    figs = figures_of(r.stdout)
    assert figs["chat_tokens_per_sec_cpu"]["median"] > 0 and figs["chat_no_cache_tokens_per_sec_cpu"]["median"] > 0
    assert figs["chat_kv_cache_speedup"]["median"] > 0
    assert all(verdict(f) == "info" for f in figs.values())
    assert "2 layers x 128 wide, vocab 551" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(bench_vs_nanochat.missing() is not None, reason=bench_vs_nanochat.missing() or "")
def test_the_nanochat_comparison_smoke_runs_both_trainers_on_one_shape_and_reports_their_ratio():
    # the first run on a machine compiles nanochat's model (a minute or two on 2 cores); later ones reuse the cache
    r = subprocess.run([PYTHON, "-m", "bench.bench_vs_nanochat", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 layers x 128 wide, vocab 4096" in r.stderr
    figs = figures_of(r.stdout)
    ratio = figs["vs_nanochat_tokens_per_sec_ratio"]
    assert ratio["median"] > 0 and len(ratio["pairs"]) == 1 and ratio["target"] == 1.0
    assert figs["builtin_tok_s_nanochat_shape"]["median"] > 0 and figs["nanochat_base_train_tok_s"]["median"] > 0


@pytest.mark.slow
def test_gpu_check_smoke_shows_oom_backoff_to_a_batch_that_fits(tmp_path):
    r = subprocess.run([PYTHON, "-m", "bench.gpu_check", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    outcomes = [(a["phase"], a["device_batch_size"], a["outcome"]) for a in result["attempts"]]
    assert outcomes[:3] == [("base", 16, "oom"), ("base", 8, "oom"), ("base", 4, "completed")]
    assert result["state"] == "done"


@pytest.mark.gpu
def test_gpu_check_on_a_real_gpu_backs_off_from_a_real_cuda_oom(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    r = subprocess.run([PYTHON, "-m", "bench.gpu_check", "--out", str(tmp_path), "--base-steps", "10"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.mark.slow
def test_tokens_per_sec_pairs_alternate_and_come_with_cpu_per_step_and_the_daemons_cpu(tmp_path):
    r = subprocess.run([PYTHON, "-m", "bench.bench_daemon", "--only-tps", "--tps-rounds", "2", "--tps-steps", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    figs = {f["name"]: f for f in map(json.loads, (line for line in r.stdout.splitlines() if line.startswith("{")))}
    assert len(figs["tokens_per_sec_ratio"]["pairs"]) == 2 and figs["tokens_per_sec_ratio"]["steps"] == 8
    cpu = figs["trainer_cpu_per_step_ratio"]
    assert cpu["target"] is None and 0.5 < cpu["median"] < 2.0
    assert set(cpu["per_step"]) == {"bare", "under"} and cpu["per_step"]["under"]["cpu_per_step"] > 0
    assert 0 <= figs["daemon_cpu_percent_while_training"]["median"] < 50


def test_the_autofit_bench_reports_its_search_time_and_probes_landing_on_the_simulated_card():
    r = subprocess.run([PYTHON, "-m", "bench.bench_autofit", "--rounds", "1", "--oom-above", "4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    figs = {f["name"]: f for f in map(json.loads, [line for line in r.stdout.splitlines() if line.startswith("{")])}
    assert figs["autofit_search_seconds_cpu"]["median"] > 0
    assert figs["autofit_search_seconds_cpu"]["probes"] == [[4, True, None], [16, False, None], [8, False, None]]
    assert figs["autofit_probes_cpu"]["median"] == 3


@pytest.mark.slow
def test_gpu_check_autofit_smoke_compares_auto_with_the_guides_batch_and_skips_cleanly_without_cuda(tmp_path):
    r = subprocess.run([PYTHON, "-m", "bench.gpu_check", "--smoke", "--autofit", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check_autofit.json").read_text())
    runs = result["runs"]
    assert (runs["guide"]["device_batch_size"], runs["auto"]["device_batch_size"]) == (2, 8)
    assert runs["auto"]["autofit"].startswith("probed 4 yes, 16 no, 8 yes") and result["ratio"] > 0
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        r = subprocess.run([PYTHON, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "skipped: no CUDA GPU" in r.stderr


@pytest.mark.gpu
def test_gpu_check_autofit_on_a_real_gpu_stays_within_the_simulated_card(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    r = subprocess.run([PYTHON, "-m", "bench.gpu_check", "--autofit", "--no-compile", "--base-steps", "12",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check_autofit.json").read_text())
    assert result["runs"]["auto"]["device_batch_size"] >= 2 and 0 < result["vram_frac"] <= 0.92
