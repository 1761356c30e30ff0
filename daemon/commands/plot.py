"""`nanod plot NAME [-o|--out PATH]`: one PNG of a job's loss, VRAM and disk.

Top: loss per step across every attempt, read from the attempt logs' step
lines (phases laid end to end, each attempt its own line so a resume that
redoes steps shows), with a mark where an attempt ended in a crash, stall or
OOM. Below: VRAM used and disk free over time from the health history, with
the same marks. matplotlib is imported only here (Agg, no pyplot: nothing
global, no display needed). `collect` gathers the data and `build_figure`
draws it, so tests can check the series without reading pixels.
"""
from __future__ import annotations

from pathlib import Path

NAME = "plot"
HELP = "draw a job's loss per step (restarts and OOMs marked), VRAM and disk over time, to a PNG"

GB = 1e9
BAD_ENDINGS = {"crashed", "stalled", "interrupted", "failed_to_start", "bad_args"}


def add_arguments(parser) -> None:
    parser.add_argument("name", metavar="NAME", help="the job")
    parser.add_argument("-o", "--out", metavar="PATH", help="where to write the PNG (default <home>/plots/NAME.png)")


def run(args, settings) -> int:
    from daemon.cli import UserError
    from daemon.commands.logs import load_record
    from daemon.commands import job_name
    job_name(args.name)
    rec = load_record(settings, args.name)
    if rec is None:
        raise UserError(f"no job named {args.name!r} in {settings.home} (nanod list shows the jobs)")
    out = Path(args.out).expanduser() if args.out else settings.home / "plots" / f"{args.name}.png"
    data = collect(settings, rec)
    fig = build_figure(data)
    try:
        out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fig.savefig(out, format="png", dpi=110)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    print(out.absolute())
    return 0


# ---- data ------------------------------------------------------------------------------
def collect(settings, rec: dict) -> dict:
    """Everything the figure shows, as plain lists: attempts' (x, loss), marks, health series."""
    from daemon.commands.logs import attempt_logs
    from daemon.trainers.builtin import parse_step_line
    name = rec["name"]
    phases = [p for p in (rec.get("spec") or {}).get("phases", []) if isinstance(p, dict)]
    names = [p.get("phase") for p in phases]
    records = {a["n"]: a for a in rec.get("attempts") or [] if isinstance(a, dict) and isinstance(a.get("n"), int)}
    series, totals = [], {}
    for n, path in sorted(attempt_logs(settings, name, rec).items()):
        att = records.get(n, {})
        steps, losses = [], []
        try:
            with open(path, "rb") as f:
                for raw in f:
                    p = parse_step_line(raw.decode(errors="replace").strip())
                    if p is not None and p.loss is not None:
                        steps.append(p.step)
                        losses.append(p.loss)
                        if p.total:
                            totals[att.get("phase")] = p.total
        except OSError:
            continue
        series.append({"attempt": n, "phase": att.get("phase"), "steps": steps, "losses": losses,
                       "outcome": att.get("outcome"), "ended_at": att.get("ended_at"),
                       "last_step": steps[-1] if steps else att.get("last_step")})
    # phases laid end to end: a phase's x starts where the previous one's num_iterations ended
    offsets, x = {}, 0
    for i, phase in enumerate(names):
        offsets[phase] = x
        args = phases[i].get("args") or {}
        x += totals.get(phase) or args.get("num_iterations") or max(
            (max(s["steps"], default=0) for s in series if s["phase"] == phase), default=0)
    for s in series:
        off = offsets.get(s["phase"], 0)
        s["x"] = [off + st for st in s["steps"]]
    if not any(s["x"] for s in series):  # logs gone (pruned by hand?): the record keeps the last 200
        progress = rec.get("progress") or {}
        pairs = progress.get("losses") or []
        off = offsets.get(progress.get("phase"), 0)
        series = [{"attempt": None, "phase": progress.get("phase"), "x": [off + s for s, _ in pairs],
                   "losses": [v for _, v in pairs], "steps": [s for s, _ in pairs], "outcome": None,
                   "ended_at": None, "last_step": None}]
    marks = []
    for s in series:
        kind = "oom" if s["outcome"] == "oom" else "restart" if s["outcome"] in BAD_ENDINGS else None
        if kind:
            last = s["last_step"] if s["last_step"] is not None else 0
            marks.append({"kind": kind, "attempt": s["attempt"], "x": offsets.get(s["phase"], 0) + last,
                          "at": s["ended_at"]})
    from daemon import health
    since = rec.get("submitted_at")
    history = health.read_history(settings, since=since if isinstance(since, (int, float)) else None)
    return {"name": name, "phases": [(p, offsets.get(p, 0)) for p in names], "series": series, "marks": marks,
            "health": health_series(history)}


def health_series(history: list[dict]) -> dict:
    """Time series from health snapshots: VRAM used per GPU, disk free per role (GB)."""
    out: dict[str, dict] = {"vram": {}, "vram_total": {}, "disk": {}}
    for snap in history:
        t = snap.get("time")
        if not isinstance(t, (int, float)):
            continue
        for g in ((snap.get("gpu") or {}).get("gpus") or []):
            if isinstance(g, dict) and g.get("used_bytes") is not None:
                out["vram"].setdefault(g.get("index", 0), ([], []))
                out["vram"][g.get("index", 0)][0].append(t)
                out["vram"][g.get("index", 0)][1].append(g["used_bytes"] / GB)
                if g.get("total_bytes"):
                    out["vram_total"][g.get("index", 0)] = g["total_bytes"] / GB
        for role, d in (snap.get("disk") or {}).items():
            if isinstance(d, dict) and d.get("free_bytes") is not None:
                out["disk"].setdefault(role, ([], []))
                out["disk"][role][0].append(t)
                out["disk"][role][1].append(d["free_bytes"] / GB)
    return out


# ---- the figure -------------------------------------------------------------------------
def build_figure(data: dict):
    """A matplotlib Figure (not pyplot's): loss per step on top, VRAM and disk over time below."""
    from datetime import datetime

    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 9), layout="constrained")
    ax_loss, ax_vram, ax_disk = fig.subplots(3, 1, height_ratios=[2, 1, 1])
    fig.suptitle(f"nanod: {data['name']}")
    for s in data["series"]:
        if s["x"]:
            label = f"attempt {s['attempt']} ({s['phase']})" if s["attempt"] is not None else "recent loss (record)"
            ax_loss.plot(s["x"], s["losses"], linewidth=0.9, label=label)
    for phase, off in data["phases"][1:]:
        ax_loss.axvline(off, color="grey", linewidth=0.8, linestyle=":")
        ax_loss.annotate(phase, (off, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                         textcoords="offset points", color="grey", fontsize=8)
    style = {"restart": ("red", "x", "restart"), "oom": ("darkorange", "v", "OOM back-off")}
    for kind, (color, marker, label) in style.items():
        ms = [m for m in data["marks"] if m["kind"] == kind]
        if ms:
            ax_loss.plot([m["x"] for m in ms], [_loss_at(data, m) for m in ms], linestyle="none", marker=marker,
                         color=color, markersize=9, label=label)
    ax_loss.set_xlabel("step (phases end to end)")
    ax_loss.set_ylabel("loss")
    if ax_loss.get_lines():
        ax_loss.legend(fontsize=8, loc="best")
    else:
        ax_loss.text(0.5, 0.5, "no step lines yet", ha="center", va="center", transform=ax_loss.transAxes)

    h = data["health"]
    for idx, (ts, used) in sorted(h["vram"].items()):
        ax_vram.plot([datetime.fromtimestamp(t) for t in ts], used, label=f"VRAM used (GPU {idx})")
        if idx in h["vram_total"]:
            ax_vram.axhline(h["vram_total"][idx], color="grey", linestyle="--", linewidth=0.8,
                            label=f"VRAM total (GPU {idx})")
    ax_vram.set_ylabel("GB")
    for role, (ts, free) in sorted(h["disk"].items()):
        ax_disk.plot([datetime.fromtimestamp(t) for t in ts], free, label=f"disk free ({role})")
    ax_disk.set_ylabel("GB")
    for ax, empty in ((ax_vram, "no VRAM readings (no GPU, or no health history)"),
                      (ax_disk, "no disk readings in the health history")):
        for m in data["marks"]:
            if isinstance(m.get("at"), (int, float)) and ax.get_lines():
                ax.axvline(datetime.fromtimestamp(m["at"]), color=style[m["kind"]][0], linewidth=0.8, alpha=0.6)
        if ax.get_lines():
            ax.legend(fontsize=8, loc="upper right")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    return fig


def _loss_at(data: dict, mark: dict) -> float:
    for s in data["series"]:
        if s["attempt"] == mark["attempt"] and s["losses"]:
            return s["losses"][-1]
    values = [v for s in data["series"] for v in s["losses"]]
    return min(values) if values else 0.0


def line_labels(fig) -> list[str]:
    """Every labelled line of the figure (for tests and for --help-ful debugging)."""
    return [ln.get_label() for ax in fig.axes for ln in ax.get_lines() if not ln.get_label().startswith("_")]
