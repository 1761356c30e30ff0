"""VRAM readings without a GPU: nvidia-smi parsing, a fake nvidia-smi on PATH, NVML stand-ins."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from daemon.gpu import vram
from daemon.gpu.vram import MIB, parse_nvidia_smi, read_gpus

ONE_GPU = "0, NVIDIA GeForce RTX 4060 Laptop GPU, 8188, 4301, 3710, 97\n"
TWO_GPUS = "0, NVIDIA GeForce RTX 3090, 24576, 1024, 23552, 5\n1, NVIDIA GeForce RTX 3060, 12288, 0, 12288, 0\n"
WSL = "0, NVIDIA GeForce RTX 4060, 8188, 512, 7676, [N/A]\n"
UNSUPPORTED = "0, Tesla K80, [Not Supported], [Not Supported], [Not Supported], [Not Supported]\n"


def test_parse_normal_line_converts_mib_to_bytes():
    [g] = parse_nvidia_smi(ONE_GPU)
    assert g.index == 0 and g.name == "NVIDIA GeForce RTX 4060 Laptop GPU"
    assert (g.total_bytes, g.used_bytes, g.free_bytes) == (8188 * MIB, 4301 * MIB, 3710 * MIB)
    assert g.util_percent == 97 and g.errors == {}


def test_parse_multi_gpu():
    gpus = parse_nvidia_smi(TWO_GPUS)
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[1].name == "NVIDIA GeForce RTX 3060" and gpus[1].free_bytes == 12288 * MIB


def test_parse_na_utilisation_keeps_memory():
    [g] = parse_nvidia_smi(WSL)
    assert g.util_percent is None and g.errors == {"util_percent": "[N/A]"}
    assert g.free_bytes == 7676 * MIB


def test_parse_not_supported_everywhere_keeps_the_name():
    [g] = parse_nvidia_smi(UNSUPPORTED)
    assert g.name == "Tesla K80"
    assert g.total_bytes is None and g.util_percent is None
    assert set(g.errors) == {"total_bytes", "used_bytes", "free_bytes", "util_percent"}


def test_parse_skips_noise_and_blank_lines():
    text = "\nNo devices were found\n" + ONE_GPU + "garbage, line\n"
    assert [g.index for g in parse_nvidia_smi(text)] == [0]
    assert parse_nvidia_smi("") == []


def test_parse_name_with_a_comma_is_kept_whole():
    [g] = parse_nvidia_smi("0, Weird, Name GPU, 100, 10, 90, 1\n")
    assert g.name == "Weird, Name GPU" and g.total_bytes == 100 * MIB


# ---- the fallbacks, with real processes ---------------------------------------------------------------

def fake_smi(bin_dir: Path, output: str, code: int = 0) -> Path:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    (bin_dir / "output.txt").write_text(output)
    exe.write_text(f"#!/bin/sh\n/bin/cat '{bin_dir / 'output.txt'}'\nexit {code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


class NoNvml:
    def nvmlInit(self):
        raise RuntimeError("NVML Shared Library Not Found")


def test_this_host_states_no_gpu_plainly(monkeypatch):
    if shutil.which("nvidia-smi"):
        pytest.skip("this host has nvidia-smi")
    reading = read_gpus()
    if reading.source == "nvml":
        pytest.skip("this host has NVML")
    assert reading.source == "none" and reading.gpus == []
    assert reading.note.startswith("no NVIDIA GPU found (NVML: ")
    assert "nvidia-smi: not found" in reading.note


def test_nvml_missing_falls_back_to_nvidia_smi_on_path(tmp_path, monkeypatch):
    fake_smi(tmp_path / "bin", TWO_GPUS)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    reading = read_gpus(nvml=NoNvml())
    assert reading.source == "nvidia-smi"
    assert [g.name for g in reading.gpus] == ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3060"]
    assert "NVML: NVML Shared Library Not Found" in reading.note


def test_nvidia_smi_off_path_in_the_wsl_location_is_found(tmp_path, monkeypatch):
    exe = fake_smi(tmp_path / "wsl", WSL)
    monkeypatch.setenv("PATH", "/nonexistent")
    reading = read_gpus(nvml=NoNvml(), smi_paths=(str(exe),))
    assert reading.source == "nvidia-smi" and reading.gpus[0].util_percent is None


def test_failing_nvidia_smi_is_reported_with_its_message(tmp_path, monkeypatch):
    fake_smi(tmp_path / "bin", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    reading = read_gpus(nvml=NoNvml(), smi_paths=())
    assert reading.source == "none"
    assert "nvidia-smi: exit 9: NVIDIA-SMI has failed" in reading.note


def test_hanging_nvidia_smi_times_out(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    exe.write_text("#!/bin/sh\nexec sleep 30\n")
    exe.chmod(0o755)
    with pytest.raises(RuntimeError, match="timed out"):
        vram.run_nvidia_smi(str(exe), timeout=0.3)


# ---- NVML, through a stand-in module with pynvml's names ------------------------------------------------

class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    def __str__(self):
        return "Not Supported"


class FakeNvml:
    NVMLError = NVMLError

    def __init__(self, gpus):
        self.gpus, self.shut = gpus, False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetName(self, h):
        return h["name"]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=h["total"], used=h["used"], free=h["total"] - h["used"])

    def nvmlDeviceGetUtilizationRates(self, h):
        if h.get("util") is None:
            raise NVMLError_NotSupported()
        return SimpleNamespace(gpu=h["util"], memory=0)


def test_nvml_unsupported_utilisation_keeps_the_other_metrics():
    nvml = FakeNvml([{"name": b"NVIDIA GeForce RTX 4060", "total": 8 << 30, "used": 1 << 30, "util": None}])
    reading = read_gpus(nvml=nvml)
    assert reading.source == "nvml" and nvml.shut
    [g] = reading.gpus
    assert g.name == "NVIDIA GeForce RTX 4060"          # bytes from old pynvml are decoded
    assert (g.total_bytes, g.used_bytes, g.free_bytes) == (8 << 30, 1 << 30, 7 << 30)
    assert g.util_percent is None and g.errors == {"utilization": "Not Supported"}


def test_nvml_reads_every_gpu():
    nvml = FakeNvml([{"name": "A", "total": 100, "used": 10, "util": 50}, {"name": "B", "total": 200, "used": 0, "util": 0}])
    reading = read_gpus(nvml=nvml)
    assert [(g.index, g.name, g.util_percent) for g in reading.gpus] == [(0, "A", 50), (1, "B", 0)]
    assert reading.to_dict()["gpus"][1]["free_bytes"] == 200
