"""`nanod notify [--test]`: where notifications go, what the outbox holds, and a test message to each target.

Without --test: the configured targets (the operator's notify_urls and notify_command, each
unfinished job's notify.urls) and the outbox's undelivered entries with their last error.
With --test: one test message to every target, through the same sending code as the daemon
(daemon/notify/deliver.py), one line per target: OK or FAIL with why. Exit 1 when one failed,
2 when nothing is configured. The test bypasses the outbox and the rate limit.
"""
from __future__ import annotations

NAME = "notify"
HELP = "show where notifications go; --test sends a test message to every URL and command"


def add_arguments(parser) -> None:
    parser.add_argument("--test", action="store_true", help="send a test message to every target and report each")


def run(args, settings) -> int:
    from daemon.cli import UserError
    from daemon.notify.events import mask_url
    from daemon.paths import config_path

    urls = [(u, "notify_urls") for u in settings.notify_urls]
    for name, job_urls in _job_urls(settings):
        urls += [(u, f"job {name}") for u in job_urls if u not in {x for x, _ in urls}]
    if not urls and not settings.notify_command:
        raise UserError(f"no notification targets: set notify_urls or notify_command in {config_path(settings.home)}, "
                        "or notify: {urls: [...]} in a job file")
    if not args.test:
        return _show(settings, urls, mask_url)
    return _test(settings, urls)


def _job_urls(settings) -> list[tuple[str, list[str]]]:
    from daemon.queue import list_jobs
    out = []
    for rec in list_jobs(settings):
        if not rec.finished:
            try:
                out.append((rec.name, list(rec.job_spec.notify.urls)))
            except ValueError:
                continue   # a record this version cannot validate: not ours to judge here
    return [(n, u) for n, u in out if u]


def _show(settings, urls, mask_url) -> int:
    from daemon.notify.outbox import Outbox
    for url, source in urls:
        print(f"url      {mask_url(url)}  ({source})")
    if settings.notify_command:
        print(f"command  {' '.join(settings.notify_command)}  (notify_command)")
    print(f"events   {', '.join(settings.notify_on)} (notify_on; a job's notify.on picks its own URLs' events)")
    box = Outbox(settings.state_dir / "notify")
    if box.dir.is_dir():
        box.load()
    pending = sorted(box.pending(), key=lambda e: e.created_at)
    print(f"outbox   {len(box.entries)} entries, {len(pending)} not yet delivered")
    for e in pending:
        for t in (t for t in e.targets if t.state == "pending"):
            err = f": {t.error}" if t.error else ""
            print(f"  {e.title}  ->  {t.label}, {t.tries} {'try' if t.tries == 1 else 'tries'}{err}")
    return 0


def _test(settings, urls) -> int:
    from daemon.notify.deliver import run_command, send_urls
    from daemon.notify.message import daemon_message
    msg = daemon_message("test", "a test message from `nanod notify --test`: this target works")
    results = []
    if urls:
        rs = send_urls([u for u, _ in urls], title=msg.title, body=msg.body, notify_type=msg.notify_type,
                       timeout=settings.notify_timeout)
        results += [(r, source) for r, (_, source) in zip(rs, urls)]
    if settings.notify_command:
        r = run_command(list(settings.notify_command), msg.env, timeout=settings.notify_timeout, cwd=settings.home
                        if settings.home.is_dir() else None)
        results.append((r, "notify_command"))
    for r, source in results:
        took = f"  {r.seconds:.2f}s" if r.ok else f": {r.error}"
        print(f"{'OK  ' if r.ok else 'FAIL'}  {r.target}  ({source}){took}")
    ok = sum(r.ok for r, _ in results)
    print(f"{ok} of {len(results)} targets took the test message")
    return 0 if ok == len(results) else 1
