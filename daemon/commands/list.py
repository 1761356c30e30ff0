"""`nanod list`: the jobs of this home in queue order, one line each."""
from __future__ import annotations

NAME = "list"
HELP = "list jobs in queue order"


def add_arguments(parser) -> None:
    pass


def run(args, settings) -> int:
    from daemon.queue import list_jobs
    recs = list_jobs(settings)
    if not recs:
        print(f"no jobs (inbox: {settings.inbox_dir})")
        return 0
    rows = [("NAME", "STATE", "PHASE", "STEP", "REASON")]
    for r in recs:
        prog = r.progress or {}
        step = f"{prog.get('step')}/{prog.get('total') or '?'}" if prog.get("step") is not None else "-"
        rows.append((r.name, r.state.value, r.phase or "-", step, r.reason))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    return 0
