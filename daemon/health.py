"""Scheduled health snapshots: VRAM, disk, host RAM and the trainer's memory; bounded history.

One snapshot is a dict (the JSON written to disk):

    {"schema": 1, "time": 1764400000.0,
     "gpu": {"source": "nvml"|"nvidia-smi"|"none", "note": "...",
             "gpus": [{"index", "name", "total_bytes", "used_bytes", "free_bytes", "util_percent", "errors"}]},
     "disk": {"checkpoints": {"path", "free_bytes", "total_bytes", "device"}, "home": {...}},
     "ram": {"total_bytes", "available_bytes"},
     "trainer": {"job", "phase", "pid", "pgid", "rss_bytes", "processes", "peak_mem_gib",
                 "gpus": [index, ...], "vram": [{"index", "used_bytes", "total_bytes"}, ...]} | null,
     "warnings": ["one line", ...],
     "errors": {"ram": "why it could not be read", ...}}

Each metric is read in its own try, so one failure costs only that metric.
The trainer's RSS is summed over its whole group (for a job on several GPUs:
the keeper, torchrun and every rank, whose sessions differ) and its VRAM is
read per GPU of the job.
The history is JSONL segments under <home>/health/ (history-<unix start>.jsonl,
about health_history / HISTORY_SEGMENTS seconds each; whole segments older than
health_history are deleted) plus latest.json written atomically. A line is
appended with one write(); readers skip a line that does not parse (a torn last
line after a crash). `read_latest` and `read_history` need no daemon:
`nanod status` and `nanod plot` call them directly.

Only `HealthMonitor` (the daemon) writes here. It takes a snapshot every
health_interval on an apscheduler background thread and calls on_warning once
for each warning as it appears (again only after it has cleared). It never
changes job state: the daemon decides what a warning means.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from daemon.atomic import read_json, write_json_atomic
from daemon.units import format_size

log = logging.getLogger("nanod.health")

SCHEMA = 1
HISTORY_SEGMENTS = 12      # the history is cut into this many files; the oldest is dropped whole
MIN_SEGMENT_SECONDS = 60.0
LATEST = "latest.json"
PREFIX, SUFFIX = "history-", ".jsonl"


# ---- one snapshot --------------------------------------------------------------------------

def take_snapshot(settings) -> dict:
    snap: dict = {"schema": SCHEMA, "time": time.time(), "gpu": None, "disk": {}, "ram": None,
                  "trainer": None, "warnings": [], "errors": {}}
    errors = snap["errors"]
    try:
        from daemon.gpu.vram import read_gpus
        snap["gpu"] = read_gpus().to_dict()
    except Exception as e:
        errors["gpu"] = _err(e)
    for key, path in (("checkpoints", settings.checkpoint_root), ("home", settings.home)):
        try:
            snap["disk"][key] = disk_usage(path)
        except Exception as e:
            errors[f"disk.{key}"] = _err(e)
    try:
        snap["ram"] = read_meminfo()
    except Exception as e:
        errors["ram"] = _err(e)
    try:
        snap["trainer"] = read_trainer(settings)
        if snap["trainer"] is not None:
            snap["trainer"]["vram"] = job_vram(snap["trainer"]["gpus"], snap["gpu"])
    except Exception as e:
        errors["trainer"] = _err(e)
    snap["warnings"] = [text for _, text in evaluate_warnings(settings, snap)]
    return snap


def evaluate_warnings(settings, snap: dict) -> list[tuple[str, str]]:
    """(key, one line) for each threshold crossed; the key stays the same while the condition lasts."""
    out = []
    for g in (snap.get("gpu") or {}).get("gpus") or []:
        total, used = g.get("total_bytes"), g.get("used_bytes")
        if total and used is not None and used > settings.vram_warn_fraction * total:
            out.append((f"vram:{g.get('index')}",
                        f"GPU {g.get('index')} VRAM {used / total:.0%} used ({format_size(used)} of "
                        f"{format_size(total)}), above {settings.vram_warn_fraction:.0%}"))
    seen_devices = set()
    for key, d in (snap.get("disk") or {}).items():
        if not d or d.get("device") in seen_devices:
            continue  # home on the checkpoints' filesystem: one warning is enough
        seen_devices.add(d.get("device"))
        if d.get("free_bytes") is not None and d["free_bytes"] < settings.disk_min_free:
            out.append((f"disk:{key}", f"disk {format_size(d['free_bytes'])} free on {d['path']} ({key}), "
                                       f"below {format_size(settings.disk_min_free)}"))
    ram = snap.get("ram")
    if ram and ram.get("available_bytes") is not None and ram["available_bytes"] < settings.ram_min_free:
        out.append(("ram", f"host RAM {format_size(ram['available_bytes'])} available, "
                           f"below {format_size(settings.ram_min_free)}"))
    return out


def disk_usage(path: Path) -> dict:
    """Free and total bytes of the filesystem that holds `path` (or its nearest existing parent)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    st = os.statvfs(p)
    # f_bavail: what an unprivileged writer (the trainer) can actually use
    return {"path": str(p), "free_bytes": st.f_bavail * st.f_frsize, "total_bytes": st.f_blocks * st.f_frsize,
            "device": os.stat(p).st_dev}


def read_meminfo(path: str = "/proc/meminfo") -> dict:
    values = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024  # kB
    return {"total_bytes": values["MemTotal"], "available_bytes": values["MemAvailable"]}


def read_trainer(settings) -> dict | None:
    """The running job's trainer: RSS summed over its process group, and its own CUDA peak."""
    from daemon import procs  # not at the top: `nanod status` imports this module for read_latest
    from daemon.queue import list_jobs
    for rec in list_jobs(settings):
        d = rec.to_dict()
        if d.get("state") != "running" or not d.get("attempts"):
            continue
        att = d["attempts"][-1]
        pid, pgid = att.get("pid"), att.get("pgid")
        progress = d.get("progress") or {}
        out = {"job": d["name"], "phase": att.get("phase"), "pid": pid, "pgid": pgid,
               "rss_bytes": None, "processes": 0, "peak_mem_gib": progress.get("peak_mem_gib"),
               "gpus": rec.job_spec.gpu_indices}
        if procs.is_alive(pid, att.get("proc_start")):
            members = procs.group_pids(pgid) if isinstance(pgid, int) else []
            members = sorted(set(members or [pid]) | set(procs.descendants(pid)))
            rss = [r for r in map(procs.rss, members) if r is not None]
            out["rss_bytes"] = sum(rss) if rss else None
            out["processes"] = len(rss)
        return out
    return None


def job_vram(gpus: list[int], gpu_reading: dict | None) -> list[dict]:
    """VRAM of each of the job's GPUs, as the snapshot read them (a GPU not read is left out)."""
    by_index = {g.get("index"): g for g in (gpu_reading or {}).get("gpus") or [] if isinstance(g, dict)}
    return [{"index": i, "used_bytes": by_index[i].get("used_bytes"), "total_bytes": by_index[i].get("total_bytes")}
            for i in gpus if i in by_index]


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


# ---- history on disk -------------------------------------------------------------------------

def segment_seconds(settings) -> float:
    return max(MIN_SEGMENT_SECONDS, settings.health_history / HISTORY_SEGMENTS)


def _segments(health_dir: Path) -> list[tuple[float, Path]]:
    out = []
    try:
        names = os.listdir(health_dir)
    except OSError:
        return []
    for n in names:
        if n.startswith(PREFIX) and n.endswith(SUFFIX):
            try:
                out.append((float(n[len(PREFIX):-len(SUFFIX)]), health_dir / n))
            except ValueError:
                pass
    return sorted(out)


_write_lock = threading.Lock()


def append_snapshot(settings, snap: dict) -> None:
    """Add a snapshot to the history, write latest.json, drop segments past health_history."""
    d = settings.health_dir
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    t = float(snap.get("time") or time.time())
    line = (json.dumps(snap, separators=(",", ":")) + "\n").encode()
    with _write_lock:
        segs = _segments(d)
        if segs and segs[-1][0] <= t < segs[-1][0] + segment_seconds(settings):
            path = segs[-1][1]
        else:
            path = d / f"{PREFIX}{int(t)}{SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a torn line from a crash stays alone, and is skipped by readers
            os.write(fd, line)
        finally:
            os.close(fd)
        write_json_atomic(d / LATEST, snap)
        cutoff = t - settings.health_history
        segs = _segments(d)
        for i, (start, p) in enumerate(segs[:-1]):
            # a segment ends where the next begins; drop it once all of it is older than the cutoff
            if segs[i + 1][0] <= cutoff:
                try:
                    p.unlink()
                except OSError as e:
                    log.warning("health: cannot delete %s: %s", p, e)


def read_latest(settings) -> dict | None:
    snap = read_json(settings.health_dir / LATEST)
    return snap if isinstance(snap, dict) else None


def read_history(settings, since: float | None = None) -> list[dict]:
    """Snapshots in time order (only those at or after `since`); torn lines skipped."""
    segs = _segments(settings.health_dir)
    out = []
    for i, (start, path) in enumerate(segs):
        if since is not None and i + 1 < len(segs) and segs[i + 1][0] <= since:
            continue  # wholly before `since`
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for raw in data.splitlines():
            try:
                snap = json.loads(raw)
            except ValueError:
                continue
            if isinstance(snap, dict) and (since is None or (snap.get("time") or 0) >= since):
                out.append(snap)
    out.sort(key=lambda s: s.get("time") or 0)
    return out


# ---- the scheduler ----------------------------------------------------------------------------

class HealthMonitor:
    """Snapshots every settings.health_interval on a background thread (apscheduler 3.x).

    The snapshot runs at once on start, then on the interval; a run that overlaps
    the next is not doubled (max_instances=1) and missed runs collapse into one
    (coalesce). on_warning(text) is called from that thread for each new warning.
    """

    def __init__(self, settings, on_warning: Callable[[str], None] | None = None):
        self.settings = settings
        self.on_warning = on_warning
        self.latest: dict | None = None
        self.count = 0
        self._active: set[str] = set()
        self._scheduler = None

    def start(self) -> None:
        from datetime import datetime, timezone

        from apscheduler.schedulers.background import BackgroundScheduler
        if self._scheduler is not None:
            return
        # apscheduler logs every run at INFO: two lines every health_interval in the daemon's log
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        self._scheduler = BackgroundScheduler(timezone=timezone.utc, daemon=True)
        self._scheduler.add_job(self.run_once, "interval", seconds=self.settings.health_interval,
                                id="health", coalesce=True, max_instances=1,
                                misfire_grace_time=max(1, int(self.settings.health_interval)),
                                next_run_time=datetime.now(timezone.utc))
        self._scheduler.start()

    def stop(self, wait: bool = True) -> None:
        if self._scheduler is not None:
            try:
                self._scheduler.shutdown(wait=wait)
            finally:
                self._scheduler = None

    def run_once(self) -> dict | None:
        """Take, store and judge one snapshot. Never raises (it runs on the scheduler's thread)."""
        try:
            snap = take_snapshot(self.settings)
            try:
                append_snapshot(self.settings, snap)
            except Exception as e:
                snap["errors"]["history"] = _err(e)
                log.warning("health: cannot write history: %s", e)
            self.latest = snap
            self.count += 1
            self._announce(evaluate_warnings(self.settings, snap))
            return snap
        except Exception:
            log.exception("health snapshot failed")
            return None

    def _announce(self, warnings: list[tuple[str, str]]) -> None:
        keys = {k for k, _ in warnings}
        new = [text for k, text in warnings if k not in self._active]
        self._active = keys  # a warning that clears is announced again if it comes back
        for text in new:
            log.warning("health: %s", text)
            if self.on_warning is not None:
                try:
                    self.on_warning(text)
                except Exception:
                    log.exception("health: on_warning failed")
