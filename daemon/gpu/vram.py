"""VRAM and utilisation readings: NVML first, nvidia-smi second, "no GPU" said plainly.

`read_gpus()` never raises. Each metric is read on its own, so one the driver
does not support (utilisation under WSL2 is the usual one) becomes None with
its error noted, and the others are kept. Under WSL2 nvidia-smi often lives in
/usr/lib/wsl/lib, off PATH; that place is tried too.

This module only reads; what counts as "too much" is health.py's business.
pynvml is imported on first use, so importing this module costs nothing.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

SMI_QUERY = "index,name,memory.total,memory.used,memory.free,utilization.gpu"
SMI_TIMEOUT = 10.0  # seconds; nvidia-smi can hang on a wedged driver
SMI_FALLBACK_PATHS = ("/usr/lib/wsl/lib/nvidia-smi",)  # WSL2 puts it here, often not on PATH
MIB = 1 << 20


@dataclass
class GpuInfo:
    index: int
    name: str | None = None
    total_bytes: int | None = None
    used_bytes: int | None = None
    free_bytes: int | None = None
    util_percent: int | None = None
    errors: dict[str, str] = field(default_factory=dict)  # metric -> why it is None


@dataclass
class GpuReading:
    source: str                                   # "nvml" | "nvidia-smi" | "none"
    gpus: list[GpuInfo] = field(default_factory=list)
    note: str = ""                                # why a source was not used, or "no NVIDIA GPU found (...)"

    def to_dict(self) -> dict:
        return asdict(self)


def read_gpus(*, nvml=None, smi_paths: tuple[str, ...] | None = None) -> GpuReading:
    """Every GPU's memory and utilisation. nvml/smi_paths: injectable for tests."""
    nvml_error = ""
    try:
        return read_nvml(nvml)
    except Exception as e:  # no library, no driver, driver/library mismatch ...
        nvml_error = _describe(e)
    smi = find_nvidia_smi(smi_paths)
    if smi is None:
        smi_error = "not found"
    else:
        try:
            gpus = run_nvidia_smi(smi)
            return GpuReading("nvidia-smi", gpus, note=f"NVML: {nvml_error}")
        except Exception as e:
            smi_error = _describe(e)
    return GpuReading("none", [], note=f"no NVIDIA GPU found (NVML: {nvml_error}; nvidia-smi: {smi_error})")


# ---- NVML ------------------------------------------------------------------------------

def read_nvml(nvml=None) -> GpuReading:
    """Readings through NVML; raises when NVML itself cannot start."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as e:
            raise RuntimeError(f"nvidia-ml-py not installed ({e})") from None
    nvml.nvmlInit()
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            info = GpuInfo(index=i)
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
            except Exception as e:
                info.errors["device"] = _describe(e)
                gpus.append(info)
                continue
            try:
                name = nvml.nvmlDeviceGetName(handle)
                info.name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception as e:
                info.errors["name"] = _describe(e)
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                info.total_bytes, info.used_bytes, info.free_bytes = int(mem.total), int(mem.used), int(mem.free)
            except Exception as e:
                info.errors["memory"] = _describe(e)
            try:
                info.util_percent = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception as e:  # NVMLError_NotSupported is common under WSL2
                info.errors["utilization"] = _describe(e)
            gpus.append(info)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    return GpuReading("nvml", gpus, note="" if gpus else "NVML found no GPU")


# ---- nvidia-smi ---------------------------------------------------------------------------

def find_nvidia_smi(extra_paths: tuple[str, ...] | None = None) -> str | None:
    found = shutil.which("nvidia-smi")
    if found:
        return found
    for p in SMI_FALLBACK_PATHS if extra_paths is None else extra_paths:
        if Path(p).is_file():
            return p
    return None


def run_nvidia_smi(exe: str, timeout: float = SMI_TIMEOUT) -> list[GpuInfo]:
    try:
        proc = subprocess.run([exe, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:g}s") from None
    if proc.returncode != 0:
        # "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver..." comes on stdout
        first = (proc.stdout.strip() or proc.stderr.strip() or "").splitlines()
        raise RuntimeError(f"exit {proc.returncode}" + (f": {first[0][:200]}" if first else ""))
    gpus = parse_nvidia_smi(proc.stdout)
    if not gpus:
        raise RuntimeError("listed no GPU")
    return gpus


_MISSING = {"[n/a]", "n/a", "[not supported]", "not supported", "[unknown error]", "[insufficient permissions]", ""}


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Parse `--query-gpu=index,name,memory.total,memory.used,memory.free,utilization.gpu
    --format=csv,noheader,nounits` output (memory in MiB). Unreadable values become
    None with the reason in errors; lines that are not GPU rows are skipped."""
    gpus = []
    for line in text.splitlines():
        raw_parts = line.split(",")
        parts = [p.strip() for p in raw_parts]
        if len(parts) < 6:
            continue
        try:
            index = int(parts[0])
        except ValueError:
            continue
        info = GpuInfo(index=index, name=",".join(raw_parts[1:-4]).strip() or None)
        for key, raw, scale in zip(("total_bytes", "used_bytes", "free_bytes", "util_percent"), parts[-4:],
                                   (MIB, MIB, MIB, 1)):
            value = _number(raw)
            if value is None:
                info.errors[key] = raw or "empty"
            else:
                setattr(info, key, int(value * scale))
        gpus.append(info)
    return gpus


def _number(raw: str) -> float | None:
    if raw.strip().lower() in _MISSING:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def _describe(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]
