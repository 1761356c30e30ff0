"""What `nanod status` shows, built once from files on disk: the JSON *is* this view.

`build_view(settings)` reads the durable state (state/daemon.json, the job
records, state/events.jsonl, rejected files in the inbox, the GPU lock's holder
file, the latest health snapshot) and returns one plain dict, schema 1
(docs/status-json.md). `nanod status --json` prints it; the text screen is
rendered from it, so the two never disagree.

It never asks the daemon anything and never changes a file: it works the same
whether the daemon is up, hung or dead, and must stay cheap (status < 0.3 s),
so nothing heavy is imported here. Liveness (is a pid alive, is a lock held,
how much disk is free) goes through a `Probe`, so tests can feed prepared
state directories a fixed world.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

SCHEMA = 1
JOB_STATES = ("queued", "waiting", "running", "backing_off", "paused", "done", "failed", "cancelled")
ACTIVE_STATES = ("running", "backing_off", "paused", "waiting")  # in the order "current" is chosen
FINISHED_STATES = ("done", "failed", "cancelled")
HEARTBEAT_STALE_S = 60.0    # a live daemon writes daemon.json every tick (0.5 s); a minute is a hang
RECENT_EVENTS = 12          # how many events the view keeps
LOSS_POINTS = 200           # recent (step, loss) pairs kept per job
# job events worth showing among the recent ones (kinds from queue/attempts/supervisor; chatter such
# as "started", "resumed", "pruned" is left out)
NOTABLE_KINDS = {"crashed", "restart", "stalled", "oom", "oom_backoff", "gave_up", "failed", "bad_args",
                 "preflight_failed", "preflight_warning", "paused", "waiting", "survivor", "killed", "error",
                 "prune_error", "phase_done", "done", "cancelled", "requeued", "retry", "relaunch", "disk_low",
                 "slurm_requeue", "slurm_trouble", "adopted", "left_running"}


# ---- the outside world (replaced by a fixed one in tests) ---------------------------
class Probe:
    """Liveness and disk readings of the real machine; read-only."""

    def now(self) -> float:
        return time.time()

    def pid_alive(self, pid: object, proc_start: object = None) -> bool:
        """Does `pid` exist (and, given its recorded start time, is it still that process)?"""
        from daemon import procs  # psutil: ~20 ms, paid only when there is a process to ask about
        return procs.is_alive(pid, proc_start)

    def lock_held(self, path: Path) -> bool:
        return lock_is_held(path)

    def disk_usage(self, path: Path) -> dict | None:
        p = Path(path)
        while not p.exists() and p != p.parent:
            p = p.parent  # the checkpoint root may not exist yet: its filesystem does
        try:
            st = os.statvfs(p)
        except OSError:
            return None
        return {"free": st.f_bavail * st.f_frsize, "total": st.f_blocks * st.f_frsize}

    def process_command(self, pid: object) -> str:
        from daemon import procs
        return procs.command(pid, limit=1000)

    def health(self, settings) -> dict | None:
        try:
            from daemon import health
        except ImportError:
            return None  # health.py not built: status still works without VRAM readings
        try:
            return health.read_latest(settings)
        except Exception:
            return None  # a torn or old snapshot must never break status


def lock_is_held(path: Path) -> bool:
    """Is an flock/POSIX lock held on `path` by anyone, without taking it?

    /proc/locks names the device and inode of every lock; looking there cannot
    make a starting daemon fail to get its lock, as a try-lock could. Where
    /proc/locks cannot say (unreadable, or a filesystem whose device numbers
    differ there), a non-blocking flock is tried and released at once.
    """
    try:
        st = os.stat(path)
    except OSError:
        return False  # no lock file: nobody has ever held it
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return _try_flock(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    ambiguous = False
    for line in text.splitlines():
        fields = line.split()
        if "->" in fields:
            continue  # a waiter, not a holder
        for field in fields:
            parts = field.split(":")
            if len(parts) == 3 and parts[2].isdigit() and int(parts[2]) == st.st_ino:
                if f"{parts[0]}:{parts[1]}" == dev:
                    return True
                ambiguous = True
    return _try_flock(path) if ambiguous else False


def _try_flock(path: Path) -> bool:
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# ---- reading files ------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_job_records(settings) -> list[dict]:
    """Every job record, in queue order (priority high to low, then seq).

    The JSON is read here rather than through queue.list_jobs: importing
    queue.py brings in the job-spec models (pydantic, yaml), 40 ms of status's
    300 ms. The schema is docs/architecture.md's; a test checks that records
    queue.py writes read the same here.
    """
    jobs = []
    try:
        names = sorted(os.listdir(settings.state_dir / "jobs"))
    except OSError:
        names = []
    for n in names:
        if n.endswith(".json") and not n.startswith("."):
            rec = _read_json(settings.state_dir / "jobs" / n)
            if rec and isinstance(rec.get("name"), str) and _num(rec.get("schema"), 1) <= SCHEMA:
                jobs.append(rec)
    jobs.sort(key=lambda r: (-_num(r.get("priority"), 0), _num(r.get("seq"), 0)))
    return jobs


def read_events_tail(path: Path, limit: int = 64, max_bytes: int = 65536) -> list[dict]:
    """The last `limit` events of a JSON-lines file, reading at most its last `max_bytes`."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line may be cut in half
    events = []
    for line in lines[-limit:]:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events


def read_rejected(inbox: Path) -> list[dict]:
    """Rejected inbox files still lying there, each with its one-line reason."""
    out = []
    try:
        entries = sorted(os.scandir(inbox), key=lambda e: e.name)
    except OSError:
        return out
    for e in entries:
        if e.name.endswith(".rejected") and not e.name.startswith("."):
            try:
                with open(e.path, "rb") as f:
                    reason = f.read(2000).decode(errors="replace").strip().splitlines()
                at = e.stat().st_mtime
            except OSError:
                continue
            out.append({"file": e.name[: -len(".rejected")], "reason": reason[0] if reason else "", "at": at})
    return out


# ---- building the view -----------------------------------------------------------------
def build_view(settings, *, probe: Probe | None = None) -> dict:
    """The whole status, schema 1 (docs/status-json.md)."""
    probe = probe or Probe()
    now = probe.now()
    records = read_job_records(settings)
    jobs = [job_view(r, now) for r in records]
    daemon = daemon_view(settings, probe, now)
    for j in jobs:  # a trainer can outlive the daemon (it holds the GPU lock): say whether it does
        a = j["attempt"]
        if a is not None:
            a["alive"] = (probe.pid_alive(a.get("pid"), a.get("proc_start"))
                          if a.get("ended_at") is None and a.get("pid") else None)
            on_slurm = j["slurm"] is not None and a.get("ended_at") is None   # runs on the cluster, not here
            if (a["alive"] or on_slurm) and not daemon["up"]:
                _progress_from_log(settings, j, a, now)  # nobody updates the record: read the trainer's own words
    current = next((j["name"] for s in ACTIVE_STATES for j in jobs if j["state"] == s), None)
    if current is None:  # an interrupted job queued to resume is still the one to show
        current = next((j["name"] for j in jobs if j["state"] == "queued" and j["attempts"]), None)
    health = probe.health(settings)
    events = _recent_events(settings, records)
    return {
        "schema": SCHEMA,
        "generated_at": now,
        "home": str(settings.home),
        "daemon": daemon,
        "current": current,
        "jobs": jobs,
        "gpus": gpus_view(settings, probe, records, health, jobs),
        "disk": [dict(role=role, path=str(path), **(probe.disk_usage(path) or {"free": None, "total": None}))
                 for role, path in (("checkpoints", settings.checkpoint_root), ("home", settings.home))],
        "health": _health_summary(health, now),
        "rejected": read_rejected(settings.inbox_dir),
        "events": events,
    }


def daemon_view(settings, probe: Probe, now: float) -> dict:
    info = _read_json(settings.state_dir / "daemon.json") or {}
    pid = info.get("pid")
    alive = probe.pid_alive(pid)
    held = probe.lock_held(settings.state_dir / "daemon.lock")
    up = alive and held
    started, beat = _opt_num(info.get("started_at")), _opt_num(info.get("heartbeat_at"))
    beat_age = _age(now, beat)
    stale = up and beat_age is not None and beat_age > HEARTBEAT_STALE_S
    if up:
        summary = f"up, pid {pid}" + (", but its loop has not ticked recently (hung?)" if stale else "")
    elif not info:
        summary = "down: it has never run in this home" if not held else "down: the lock is held but no daemon.json"
    elif alive and not held:
        summary = f"down: pid {pid} is alive but does not hold state/daemon.lock (not nanod)"
    elif isinstance(info.get("stopped_at"), (int, float)):
        summary = f"down: stopped cleanly {_short(now - info['stopped_at'])} ago"
    else:
        summary = f"down: pid {pid} is not running and did not stop cleanly (killed, crashed or power loss)"
    if not up and held and info:
        summary += "; something else holds state/daemon.lock (a nanod command, for a moment?)"
    return {
        "up": up,
        "summary": summary,
        "pid": pid if isinstance(pid, int) else None,
        "pid_alive": alive,
        "lock_held": held,
        "started_at": started,
        "uptime_s": _age(now, started) if up else None,
        "heartbeat_at": beat,
        "heartbeat_age_s": beat_age,
        "heartbeat_stale": stale,
        "stopped_at": _opt_num(info.get("stopped_at")) if not up else None,
        "version": info.get("version"),
        "inbox": str(settings.inbox_dir),
        "inbox_mode": info.get("inbox_mode") if up else None,
        "inbox_mode_reason": (info.get("inbox_mode_reason") or "") if up else "",
    }


def job_view(rec: dict, now: float) -> dict:
    spec = rec.get("spec") if isinstance(rec.get("spec"), dict) else {}
    phases = [p.get("phase") for p in spec.get("phases", []) if isinstance(p, dict)]
    index = int(_num(rec.get("phase_index"), 0))
    state = rec.get("state") if rec.get("state") in JOB_STATES else "queued"
    attempts = [a for a in rec.get("attempts") or [] if isinstance(a, dict)]
    last = attempts[-1] if attempts else None
    phase_name = phases[index] if 0 <= index < len(phases) else (last or {}).get("phase")
    recovery = spec.get("recovery") if isinstance(spec.get("recovery"), dict) else {}
    events = [e for e in rec.get("events") or [] if isinstance(e, dict)]
    dbs = rec.get("device_batch_size") if isinstance(rec.get("device_batch_size"), dict) else {}
    working_dbs = dbs.get(phase_name) if phase_name else None
    if working_dbs is None and last is not None:
        working_dbs = last.get("device_batch_size")
    return {
        "name": rec.get("name"),
        "state": state,
        "state_since": _opt_num(rec.get("state_since")),
        "reason": rec.get("reason") or "",
        "priority": rec.get("priority", 0),
        "seq": rec.get("seq"),
        "submitted_at": _opt_num(rec.get("submitted_at")),
        "source": rec.get("source"),
        "model_tag": spec.get("model_tag"),
        "gpu": (job_gpus(spec) or [None])[0],
        "gpus": job_gpus(spec),
        "slurm": _slurm_view(spec, last, now),
        "phase": {"index": index, "count": len(phases), "name": phase_name, "names": phases},
        "progress": _progress_view(rec, state, last, now),
        "checkpoint": _checkpoint_view(rec.get("checkpoint"), now),
        "attempts": len(attempts),
        "restarts": sum(1 for prev in attempts[:-1] if prev.get("outcome") != "completed"),
        "restarts_without_progress": rec.get("restarts_without_progress", 0),
        "max_restarts_without_progress": recovery.get("max_restarts_without_progress"),
        "oom_backoffs": sum(1 for e in events if e.get("kind") == "oom_backoff"),
        "device_batch_size": working_dbs,
        "device_batch_size_auto": _asks_auto(spec, index),
        "next_attempt_at": _opt_num(rec.get("next_attempt_at")),
        "attempt": _attempt_view(last),
        "error": _last_error(rec, attempts) if state == "failed" else "",
    }


def _asks_auto(spec: dict, index: int) -> bool:
    """Whether the current phase asks for device_batch_size auto (the working value is then its choice)."""
    phases = spec.get("phases") if isinstance(spec.get("phases"), list) else []
    phase = phases[index] if 0 <= index < len(phases) and isinstance(phases[index], dict) else {}
    args = phase.get("args") if isinstance(phase.get("args"), dict) else {}
    return args.get("device_batch_size") == "auto"


def _progress_view(rec: dict, state: str, last: dict | None, now: float) -> dict | None:
    p = rec.get("progress")
    if not isinstance(p, dict) or p.get("step") is None:
        return None
    step, total = _num(p.get("step"), 0), _opt_num(p.get("total"))
    dt_ms = _opt_num(p.get("dt_ms"))
    at = _opt_num(p.get("at"))
    eta = None
    if state == "running" and total:
        remaining = max(0.0, total - step)
        if dt_ms:
            eta = remaining * dt_ms / 1000.0
        elif last and at and last.get("started_at"):
            done = step - _num(last.get("first_step") or last.get("resumed_from"), 0)
            if done > 0:
                eta = remaining * (at - _num(last["started_at"], at)) / done
    losses = trajectory(p.get("losses") or [])[-LOSS_POINTS:]
    return {
        "phase": p.get("phase"),
        "step": int(step),
        "total": None if total is None else int(total),
        "percent": None if not total else round(100.0 * step / total, 2),
        "loss": _opt_num(p.get("loss")),
        "tok_per_sec": _opt_num(p.get("tok_per_sec")),
        "dt_ms": dt_ms,
        "peak_mem_gib": _opt_num(p.get("peak_mem_gib")),
        "at": at,
        "age_s": _age(now, at),
        "eta_s": None if eta is None else round(eta, 1),
        "losses": losses,
        "from_log": False,
    }


def trajectory(pairs: list) -> list[list]:
    """The (step, loss) path that led to the newest step: a resume that redoes steps, or a new
    phase starting at step 1, replaces what came after that step (and a re-read log repeats nothing)."""
    out: list[list] = []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            continue
        step, loss = pair
        if _opt_num(step) is None or _opt_num(loss) is None:
            continue
        while out and out[-1][0] >= step:
            out.pop()
        out.append([int(step), float(loss)])
    return out


def _progress_from_log(settings, job: dict, attempt: dict, now: float) -> None:
    """The newest step line in the tail of a live attempt's log, over the (stale) recorded progress."""
    log = attempt.get("log") or ""
    path = Path(log) if os.path.isabs(log) else settings.home / log
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read()
            at = os.fstat(f.fileno()).st_mtime
    except OSError:
        return
    from daemon.trainers.builtin import parse_step_line  # the daemon's own reading of a step line
    for line in reversed(tail.splitlines()):
        parsed = parse_step_line(line.decode("utf-8", "replace").strip())
        if parsed and parsed.loss is not None:
            p = job["progress"] or {"phase": attempt.get("phase"), "losses": [], "tok_per_sec": None,
                                    "dt_ms": None, "peak_mem_gib": None, "eta_s": None}
            step, total, loss = parsed.step, parsed.total or p.get("total"), parsed.loss
            if p.get("step") is not None and step <= p["step"]:
                return
            p.update(step=step, total=total, loss=loss, at=at, age_s=_age(now, at), from_log=True,
                     percent=round(100.0 * step / total, 2) if total else None)
            p["losses"] = trajectory(p.get("losses", []) + [[step, loss]])[-LOSS_POINTS:]
            job["progress"] = p
            return


def _checkpoint_view(c: object, now: float) -> dict | None:
    if not isinstance(c, dict) or c.get("step") is None:
        return None
    at = _opt_num(c.get("at"))
    return {"phase": c.get("phase"), "step": c.get("step"), "at": at, "bytes": c.get("bytes"),
            "age_s": _age(now, at)}


def _attempt_view(a: dict | None) -> dict | None:
    if a is None:
        return None
    return {k: a.get(k) for k in ("n", "phase", "pid", "proc_start", "started_at", "ended_at", "outcome", "exit_code",
                                   "resumed_from", "device_batch_size", "log", "error")}


def _last_error(rec: dict, attempts: list[dict]) -> str:
    for a in reversed(attempts):
        if a.get("error"):
            return str(a["error"]).splitlines()[0]
    return rec.get("reason") or ""


def _slurm_view(spec: dict, last: dict | None, now: float) -> dict | None:
    """A SLURM job's batch job as the daemon last saw it (the attempt's record), null for a local job."""
    cfg = spec.get("slurm")
    if not isinstance(cfg, dict):
        return None
    seen = (last or {}).get("slurm") if isinstance((last or {}).get("slurm"), dict) else {}
    since = _opt_num(seen.get("since"))
    return {"job_id": seen.get("job_id"), "name": seen.get("name"), "state": seen.get("state"),
            "reason": seen.get("reason") or "", "node": seen.get("node") or None,
            "restarts": seen.get("restarts") if isinstance(seen.get("restarts"), int) else 0,
            "since": since, "age_s": _age(now, since), "partition": cfg.get("partition"),
            "script": seen.get("script") or None}


def job_gpus(spec: dict) -> list[int]:
    """A recorded spec's GPUs on this machine, in rank order: gpus, else [gpu], else [0]; none on SLURM."""
    if isinstance(spec.get("slurm"), dict):
        return []
    gpus = spec.get("gpus")
    if isinstance(gpus, list) and gpus and all(isinstance(g, int) and not isinstance(g, bool) for g in gpus):
        return list(gpus)
    return [int(_num(spec.get("gpu"), 0))]


def gpus_view(settings, probe: Probe, records: list[dict], health: dict | None, jobs: list[dict]) -> list[dict]:
    """Each GPU that matters: index 0, those a live job uses, those health saw; lock holder, VRAM and
    the unfinished job (first in queue order) that uses it: a job on several GPUs is on each of them."""
    readings = {}
    gpu = (health or {}).get("gpu") if isinstance((health or {}).get("gpu"), dict) else {}
    for g in gpu.get("gpus") or []:
        if isinstance(g, dict):
            readings[int(_num(g.get("index"), 0))] = g
    indices = {0} | set(readings)
    users: dict[int, str] = {}
    for s in ACTIVE_STATES:
        for j in jobs:
            if j["state"] == s:
                for i in j["gpus"]:
                    users.setdefault(i, j["name"])
    indices |= {i for j in jobs if j["state"] not in FINISHED_STATES for i in j["gpus"]}
    at = _opt_num((health or {}).get("time"))
    out = []
    for i in sorted(indices):
        path = settings.gpu_lock_path(i)
        held = probe.lock_held(path)
        holder = _read_json(path.with_name(path.name + ".holder.json")) if held else None
        if holder is not None and not holder.get("command") and holder.get("pid"):
            holder["command"] = probe.process_command(holder.get("pid"))
        g = readings.get(i)
        vram = None
        if g is not None:
            vram = {"name": g.get("name"), "used": _opt_num(g.get("used_bytes")),
                    "total": _opt_num(g.get("total_bytes")), "free": _opt_num(g.get("free_bytes")),
                    "util": _opt_num(g.get("util_percent")), "at": at}
        out.append({"index": i, "lock": {"path": str(path), "held": held, "holder": holder}, "vram": vram,
                    "job": users.get(i)})
    return out


def _health_summary(health: dict | None, now: float) -> dict | None:
    """The latest snapshot's gist (daemon/health.py's schema; its full form is `nanod plot`'s)."""
    if not health:
        return None
    at = _opt_num(health.get("time"))
    gpu = health.get("gpu") if isinstance(health.get("gpu"), dict) else {}
    ram = health.get("ram") if isinstance(health.get("ram"), dict) else {}
    trainer = health.get("trainer") if isinstance(health.get("trainer"), dict) else {}
    return {"at": at, "age_s": _age(now, at), "warnings": [str(w) for w in health.get("warnings") or []],
            "gpu_source": gpu.get("source"), "gpu_note": gpu.get("note") or "",
            "ram": {"total": _opt_num(ram.get("total_bytes")), "available": _opt_num(ram.get("available_bytes"))},
            "trainer_rss": _opt_num(trainer.get("rss_bytes")),
            "trainer_processes": trainer.get("processes") if isinstance(trainer.get("processes"), int) else None}


def _recent_events(settings, records: list[dict]) -> list[dict]:
    """Global events and each job's notable ones, newest last."""
    merged = []
    for ev in read_events_tail(settings.state_dir / "events.jsonl"):
        merged.append({"at": _opt_num(ev.get("at")), "kind": str(ev.get("kind", "")), "job": ev.get("job"),
                       "file": ev.get("file"), "attempt": None, "message": _one_line(ev.get("message"))})
    for rec in records:
        for ev in (rec.get("events") or [])[-RECENT_EVENTS:]:
            if isinstance(ev, dict) and (ev.get("kind") in NOTABLE_KINDS or str(ev.get("kind")).startswith("stop_")):
                merged.append({"at": _opt_num(ev.get("at")), "kind": str(ev.get("kind")), "job": rec.get("name"),
                               "file": None, "attempt": ev.get("attempt"), "message": _one_line(ev.get("message"))})
    merged.sort(key=lambda e: e["at"] or 0.0)
    newest: dict[tuple, dict] = {}  # the same warning at each phase start is said once, at its latest
    for ev in merged:
        newest.pop((ev["kind"], ev["job"], ev["message"]), None)
        newest[(ev["kind"], ev["job"], ev["message"])] = ev
    return list(newest.values())[-RECENT_EVENTS:]


def _short(seconds: float) -> str:
    from daemon.units import format_duration
    return format_duration(seconds)


def _age(now: float, at: float | None) -> float | None:
    return None if at is None else round(max(0.0, now - at), 1)


def _one_line(message: object) -> str:
    text = "" if message is None else str(message)
    return text.strip().splitlines()[0] if text.strip() else ""


def _num(v: object, default: float) -> float:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _opt_num(v: object) -> float | None:
    """A finite number or None: NaN/inf (a diverged loss) would make the JSON invalid for scripts."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None
