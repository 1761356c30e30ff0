"""`nanod status`: where things stand, read from files (works with the daemon down).

The view is built once by daemon/statusview.py; `--json` prints it (schema in
docs/status-json.md) and the text screen below is drawn from it. The screen
fits 80 columns (a phone over ssh) and is coloured with plain ANSI codes on a
terminal: importing rich would cost a quarter of the 0.3 s budget.
"""
from __future__ import annotations

import os
import sys

NAME = "status"
QUICK_SETTINGS = True  # read-only: settings from the cache a full load leaves (daemon/settings_cache.py)
HELP = "show the daemon, the current job, the queue and recent events"

SPARKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 32
STATE_STYLE = {"running": "green", "waiting": "cyan", "queued": "cyan", "backing_off": "yellow",
               "paused": "yellow", "done": "green", "failed": "red", "cancelled": "dim"}
ANSI = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36", "redbold": "1;31"}


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the status as JSON (schema: docs/status-json.md)")
    parser.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between refreshes (--watch)")
    parser.add_argument("--exit-code", action="store_true",
                        help="exit 1 when the daemon is down or a job has failed (for scripts and alerts)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the screen (auto: on a terminal, unless NO_COLOR is set)")


def run(args, settings) -> int:
    from daemon.cli import UserError
    from daemon.statusview import build_view
    if args.interval <= 0:
        raise UserError("--interval must be a positive number of seconds")
    tty = sys.stdout.isatty()
    color = args.color == "always" or (args.color == "auto" and tty and not os.environ.get("NO_COLOR")
                                        and os.environ.get("TERM") != "dumb")
    if not args.watch:
        view = build_view(settings)
        sys.stdout.write(_output(view, args.json, color, tty, indent=2))
        return _exit_code(view) if args.exit_code else 0
    import time
    first = True
    try:
        while True:
            view = build_view(settings)
            out = _output(view, args.json, color, tty, indent=None)
            if tty and not args.json:
                # home, each line cleared to its end, then everything below: no flicker
                out = "\x1b[H" + out.replace("\n", "\x1b[K\n") + "\x1b[J"
                if first:
                    out = "\x1b[2J" + out
            elif not args.json and not first:
                out = "\n" + out
            sys.stdout.write(out)
            sys.stdout.flush()
            first = False
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _output(view: dict, as_json: bool, color: bool, tty: bool, indent) -> str:
    if as_json:
        import json
        return json.dumps(view, indent=indent, ensure_ascii=False) + "\n"
    width = 80
    if tty:
        import shutil
        width = max(40, shutil.get_terminal_size((80, 24)).columns)
    return render_text(view, width=width, color=color)


def _exit_code(view: dict) -> int:
    return 1 if not view["daemon"]["up"] or any(j["state"] == "failed" for j in view["jobs"]) else 0


# ---- the screen ---------------------------------------------------------------------------
class _Screen:
    """Lines of (text, style) segments; long messages wrap under their indent instead of being cut."""

    def __init__(self, width: int):
        self.width, self.lines = width, []

    def add(self, *segments) -> None:
        self.lines.append(list(segments))

    def para(self, lead: str, text: str, style: str | None = None, lead_style: str | None = None,
             max_lines: int = 3) -> None:
        import textwrap
        room = max(10, self.width - len(lead))
        parts = textwrap.wrap(text, room, break_long_words=True, break_on_hyphens=False) or [""]
        if len(parts) > max_lines:
            parts = parts[:max_lines]
            parts[-1] = parts[-1][: room - 1] + "…"
        for i, part in enumerate(parts):
            self.add((lead if i == 0 else " " * len(lead), lead_style), (part, style))


def render_text(view: dict, width: int = 80, color: bool = False) -> str:
    """The status screen; every line at most `width` columns."""
    sc = _Screen(width)
    now = view["generated_at"]
    d = view["daemon"]
    _daemon_line(sc, d)
    mode = f" ({d['inbox_mode']})" if d["up"] and d.get("inbox_mode") else ""
    sc.add(("inbox  ", "bold"), (_short_path(d["inbox"], width - 7 - len(mode)) + mode, None))
    if d["up"] and d.get("inbox_mode_reason"):
        sc.para("       ", d["inbox_mode_reason"], "yellow")
    if not d["up"]:
        sc.para("       ", "showing the saved state · start: systemctl --user start nanod", "dim")
    jobs = {j["name"]: j for j in view["jobs"]}
    current = jobs.get(view["current"]) if view["current"] else None
    sc.add()
    if current:
        _job_block(sc, current, d["up"], now)
    else:
        sc.para("", "no job running. Drop a plan into the inbox, or: nanod submit FILE", None)
    health = view.get("health") or {}
    for g in view["gpus"]:
        sc.add(*_gpu_line(g, health))
    if health.get("gpu_note") and not any(g.get("vram") for g in view["gpus"]):
        sc.para("       ", health["gpu_note"], "dim", max_lines=2)
    ram = health.get("ram") or {}
    if ram.get("total"):
        running = current is not None and current["state"] in ("running", "paused")
        rss = f" · trainer {_size(health['trainer_rss'])}" if health.get("trainer_rss") and running else ""
        if rss and len(current.get("gpus") or []) > 1 and health.get("trainer_processes"):
            rss += f" ({health['trainer_processes']} processes)"  # summed over torchrun's group
        sc.add(("ram    ", "bold"), (f"{_size(ram['available'])} available of {_size(ram['total'])}{rss}", None))
    sc.add(("disk   ", "bold"), (_disk_text(view["disk"]), None))
    for w in health.get("warnings") or []:
        sc.para("warn   ", w, "yellow", "yellow")
    waiting = [j for j in view["jobs"] if j["state"] in ("queued", "waiting", "backing_off", "paused")
               and j["name"] != view["current"]]
    if waiting:
        sc.add()
        sc.add((f"queue ({len(waiting)})", "bold"))
        for j in waiting:
            sc.para("  " + _pad(j["name"], 16) + " " + _pad(j["state"], 12), j["reason"] or "", None)
    finished = sorted((j for j in view["jobs"] if j["state"] in ("done", "failed", "cancelled")),
                      key=lambda j: j["state_since"] or 0)[-3:]
    if finished:
        sc.add()
        sc.add(("finished", "bold"))
        for j in finished:
            why = j["error"] or j["reason"] if j["state"] == "failed" else j["reason"]
            sc.add(("  " + _pad(j["name"], 16) + " ", None), (_pad(j["state"], 10), STATE_STYLE[j["state"]]),
                   (_ago(j["state_since"], now), "dim"))
            if why:
                sc.para("    ", why, "red" if j["state"] == "failed" else None)
    rejected = view.get("rejected") or []
    if rejected:
        sc.add()
        sc.add((f"rejected files in the inbox ({len(rejected)})", "bold"))
        for r in rejected[-5:]:
            reason = r["reason"].removeprefix(r["file"] + ": ")
            sc.para("  ", f"{r['file']}: {reason}", "red")
    shown = {r["file"] for r in rejected}
    events = [ev for ev in view["events"] if ev["kind"] != "accepted"
              and not (ev["kind"] == "rejected" and ev.get("file") in shown)][-6:]
    if events:
        sc.add()
        sc.add(("recent", "bold"))
        for ev in events:
            _event_lines(sc, ev, now)
    return "".join(_draw(line, width, color) + "\n" for line in sc.lines)


def _daemon_line(sc: _Screen, d: dict) -> None:
    if d["up"]:
        up = f"up {_dur(d['uptime_s'])}, pid {d['pid']}" if d.get("uptime_s") is not None else f"up, pid {d['pid']}"
        line = [("nanod  ", "bold"), (up, "green")]
        if d.get("heartbeat_stale"):
            line.append((f" · no heartbeat for {_dur(d['heartbeat_age_s'])}: hung?", "redbold"))
        elif d.get("version"):
            line.append((f" · v{d['version']}", "dim"))
        sc.add(*line)
        return
    seen = f"; last heartbeat {_dur(d['heartbeat_age_s'])} ago" if d.get("heartbeat_age_s") is not None \
        and not d.get("stopped_at") else ""
    sc.para("nanod  ", "DOWN · " + d["summary"].removeprefix("down: ") + seen, "redbold", "bold")


def _job_block(sc: _Screen, j: dict, daemon_up: bool, now: float) -> None:
    ph = j["phase"]
    a = j.get("attempt") or {}
    head = [(j["name"], "bold"), ("  ", None), (j["state"].replace("_", " ").upper(), STATE_STYLE[j["state"]])]
    if ph["count"]:
        head.append((f"  {ph['name'] or '?'} (phase {ph['index'] + 1}/{ph['count']})", None))
    if a.get("n"):
        running = a.get("pid") and not a.get("ended_at")
        head.append((f" · attempt {a['n']}" + (f", pid {a['pid']}" if running else ""), None))
    sc.add(*head)
    if len(j.get("gpus") or []) > 1:
        sc.add((f"  gpus {', '.join(map(str, j['gpus']))} · one rank each through torchrun", None))
    if j.get("slurm"):
        sc.add((_slurm_text(j["slurm"]), None))
    if not daemon_up and j["state"] in ("running", "backing_off", "waiting"):
        alive = a.get("alive")
        note = "" if alive is None else "; its trainer is still running" if alive else "; its trainer is not running"
        sc.para("  ", "as recorded before the daemon stopped" + note, "yellow")
    said = j.get("slurm") and j["slurm"].get("job_id") and j["reason"].startswith(f"SLURM job {j['slurm']['job_id']} ")
    if j["reason"] and j["state"] != "running" and not said:   # (the slurm line says it already)
        sc.para("  ", j["reason"], STATE_STYLE[j["state"]])
    if j["state"] == "backing_off" and j.get("next_attempt_at") is not None:
        sc.add((f"  next attempt in {_dur(max(0.0, j['next_attempt_at'] - now))}", "yellow"))
    p = j.get("progress")
    if p:
        bits = [f"  step {p['step']}" + (f"/{p['total']}" if p["total"] else "")]
        if p.get("percent") is not None:
            bits.append(f"{p['percent']:.1f}%")
        if p.get("eta_s") is not None and daemon_up:
            bits.append(f"ETA {_dur(p['eta_s'])}")
        if p.get("tok_per_sec") is not None:
            bits.append(f"{p['tok_per_sec']:,.0f} tok/s")
        if p.get("dt_ms") is not None:
            bits.append(f"{p['dt_ms']:,.0f}ms/step")
        sc.add(("  ".join(bits), None))
        if j["state"] == "running" and p.get("age_s") is not None and p["age_s"] >= 60:
            sc.add((f"  last step line {_dur(p['age_s'])} ago", "yellow"))
        if p.get("loss") is not None:
            losses = p.get("losses") or []
            spark = sparkline([v for _, v in losses], SPARK_WIDTH)
            span = f"  steps {losses[0][0]}-{losses[-1][0]}" if len(losses) > 1 else ""
            sc.add((f"  loss {p['loss']:.4f} ", None), (spark, "cyan"), (span, "dim"))
    c = j.get("checkpoint")
    if c:
        size = f", {_size(c['bytes'])}" if c.get("bytes") else ""
        age = f", {_dur(c['age_s'])} ago" if c.get("age_s") is not None else ""
        sc.add((f"  checkpoint {c['phase']} step {c['step']}{age}{size}", None))
    elif j["attempts"]:
        sc.add(("  no checkpoint yet", "dim"))
    if j["attempts"]:
        budget = j.get("max_restarts_without_progress")
        rwp = f" ({j['restarts_without_progress']}/{budget} without progress)" if budget is not None else ""
        line = f"  restarts {j['restarts']}{rwp} · OOM back-offs {j['oom_backoffs']}"
        if j.get("device_batch_size") is not None:
            auto = " (auto)" if j.get("device_batch_size_auto") else ""
            line += f" · device_batch_size {j['device_batch_size']}{auto}"
        elif j.get("device_batch_size_auto"):
            line += " · device_batch_size auto (not chosen yet)"
        sc.add((line, "yellow" if j["restarts"] or j["oom_backoffs"] else None))


def _slurm_text(sl: dict) -> str:
    """`  slurm job 123 PENDING (BeginTime) · requeued 1x` / `  slurm job 123 RUNNING on node7`."""
    if not sl.get("job_id"):
        return f"  on SLURM (partition {sl['partition']}) · not submitted yet" if sl.get("partition") \
            else "  on SLURM · not submitted yet"
    text = f"  slurm job {sl['job_id']} {sl.get('state') or '?'}"
    if sl.get("reason") and sl.get("state") != "RUNNING":
        text += f" ({sl['reason']})"
    if sl.get("node") and sl.get("state") == "RUNNING":
        text += f" on {sl['node']}"
    if sl.get("restarts"):
        text += f" · requeued {sl['restarts']}x"
    return text


def _gpu_line(g: dict, health: dict) -> list:
    lock = g["lock"]
    if lock["held"]:
        h = lock.get("holder") or {}
        who = f"pid {h['pid']}" if h.get("pid") else "another process"
        what = h.get("job") or h.get("command") or ""
        text = f"locked by {who}" + (f" ({what})" if what else "")
    else:
        text = "lock free"
    v = g.get("vram")
    if v and v.get("total"):
        text += f" · VRAM {_size(v['used'])}/{_size(v['total'])}"
        if v.get("util") is not None:
            text += f" · util {v['util']:.0f}%"
        if (health.get("age_s") or 0) > 300:
            text += f" ({_short_age(health['age_s'])} ago)"  # the daemon takes the readings; it is not doing so
    else:
        text += " · VRAM n/a"
    return [(_pad(f"gpu{g['index']}", 7), "bold"), (text, None)]


def _disk_text(disks: list[dict]) -> str:
    known = [x for x in disks if x.get("free") is not None]
    if not known:
        return "n/a"
    if all((x["free"], x["total"]) == (known[0]["free"], known[0]["total"]) for x in known):
        roles = " and ".join(x["role"] for x in known)
        return f"{_size(known[0]['free'])} free of {_size(known[0]['total'])} ({roles})"
    return " · ".join(f"{x['role']} {_size(x['free'])} free of {_size(x['total'])}" for x in known)


def _event_lines(sc: _Screen, ev: dict, now: float) -> None:
    kind = ev["kind"]
    style = "red" if kind in ("rejected", "failed", "crashed", "gave_up", "bad_args") else \
        "yellow" if kind in ("oom", "oom_backoff", "stalled", "health_warning", "paused", "disk_low") else None
    who = ev.get("job") or ev.get("file") or ""
    msg = ev["message"]
    if who and who not in msg:
        msg = f"{who}: {msg}"
    ago = _short_age(now - ev["at"]) if ev.get("at") is not None else "?"
    sc.para(f"  {ago:>6}  ", f"{kind.replace('_', ' ')} · {msg}", style, max_lines=2)


# ---- small pieces -------------------------------------------------------------------------
def sparkline(values: list[float], width: int = SPARK_WIDTH) -> str:
    """Unicode blocks for the values, averaged down to at most `width` characters."""
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return ""
    if len(values) > width:
        size = len(values) / width
        values = [sum(chunk) / len(chunk) for chunk in
                  (values[int(i * size):max(int(i * size) + 1, int((i + 1) * size))] for i in range(width))]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return SPARKS[len(SPARKS) // 2] * len(values)
    return "".join(SPARKS[int((v - lo) / (hi - lo) * (len(SPARKS) - 1) + 0.5)] for v in values)


def _draw(segments: list, width: int, color: bool) -> str:
    out, used = [], 0
    for text, style in segments:
        text = text.replace("\n", " ")
        if used >= width:
            break
        if used + len(text) > width:
            text = text[: max(0, width - used - 1)] + "…"
        used += len(text)
        out.append(f"\x1b[{ANSI[style]}m{text}\x1b[0m" if color and style and text else text)
    return "".join(out).rstrip() if not color else "".join(out)


def _short_age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _short_path(path: str, room: int) -> str:
    home = os.path.expanduser("~")
    if home not in ("", "/") and (path == home or path.startswith(home + "/")):
        path = "~" + path[len(home):]
    return path if len(path) <= room else "…" + path[-(max(room, 10) - 1):]


def _pad(text: str, n: int) -> str:
    return text if len(text) >= n else text + " " * (n - len(text))


def _dur(seconds) -> str:
    from daemon.units import format_duration
    return "?" if seconds is None else format_duration(seconds)


def _ago(at, now) -> str:
    return "" if at is None else _dur(max(0.0, now - at)) + " ago"


def _size(n) -> str:
    from daemon.units import format_size
    return "?" if n is None else format_size(n)
