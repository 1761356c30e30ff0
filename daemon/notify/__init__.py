"""Notifications: a job's events (done, failed, gave up, stalled, ...) sent to apprise URLs and the
operator's notify_command.

- events.py   the event names, which job events become which notification, URL syntax (stdlib only)
- message.py  the text: a one-line title a phone shows whole, a body with the reason and status line
- outbox.py   the durable outbox under <home>/state/notify/: what is to send, what was delivered
- notifier.py the Queue observer that fills the outbox, and the sender thread that empties it
- deliver.py  the sending itself: apprise in a short-lived subprocess, the operator's command

This package never changes a job's state and never runs in the daemon loop's thread except to
write an outbox entry. apprise is imported only by deliver.py, in the subprocess that sends (and in
CLI commands that check URLs), never in the daemon: loading its plugins costs ~35 MB of RSS.
Nothing is imported here, so `python -m daemon.notify.deliver` stays light.
"""
