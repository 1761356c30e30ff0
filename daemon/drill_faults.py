"""The drill's faults: how each one is injected into a live job, and what it recorded.

`Faults` is mixed into `daemon.drill.Drill`, which provides the job's view
(record, running/stepping attempts, checkpoint folders, the daemon process,
waiting with a deadline). Each injector returns a FaultRecord: when the fault
hit, at which step, how the job recovered, how long that took and how many
steps were lost against the fault's bound. Nothing here decides what to
inject or checks the promises (drill.py does).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from trainer import layout

FAULTS = ("kill_trainer", "kill_in_save", "stop_trainer", "kill_daemon", "torn_checkpoint", "disk_full", "bad_files")
SAVE_EVERY = 6
BAD_FILES = {  # name -> content: each must be rejected, none may hurt the daemon
    "bad-yaml.yaml": b"phases: [ {phase: base\n",
    "bad-type.yaml": b"phases: [{phase: base, args: {depth: 'eight'}}]\n",
    "bad-key.yaml": b"phasez: []\n",
    "bad-utf8.yaml": b"name: \xff\xfe\n",
    "bad-name.yaml": b"name: ../../etc\nphases: [{phase: base}]\n",
}


@dataclass
class FaultRecord:
    kind: str
    at: float                    # seconds since the drill's daemon started
    phase: str = ""
    step: int | None = None      # steps completed when the fault hit
    recovery: str = ""
    took: float | None = None    # fault -> next attempt's first step (or back to running)
    lost: int | None = None
    bound: int | None = None
    note: str = ""
    landed: bool = True          # False: the fault could not be injected (the note says why)

    @property
    def ok(self) -> bool:
        return self.took is not None and (self.lost is None or self.bound is None or self.lost <= self.bound)


class Faults:
    """The injectors (a mixin of Drill)."""

    def inject(self, kind: str, tries: int = 3) -> FaultRecord:
        """Inject one fault; one that finds its attempt already ended (its phase completed just
        before) goes to the next attempt instead, so that the faults asked for all land."""
        for _ in range(tries):
            try:
                return self._inject(kind)
            except ProcessLookupError:
                if self.finished():
                    break
                time.sleep(1.0)   # the record catches up with the ended attempt within a tick
        return FaultRecord(kind, round(self.now(), 1), recovery="-", took=0.0, landed=False,
                           note="skipped: the attempt ended just before the fault landed")

    def _inject(self, kind: str) -> FaultRecord:
        att = self.wait_for(self.stepping_attempt, 120, "a running attempt")
        time.sleep(self.rng.uniform(0.3, 1.5))
        if kind in ("kill_trainer", "torn_checkpoint"):
            # between saves: a save is durable only once its background write lands, so a kill while one
            # is in flight can lose up to 2 x save_every; that case is kill_in_save's, with its own bound
            try:
                self.wait_for(lambda: not saving(self.ckpt_dir(att["phase"])), 20, "no save in flight")
            except TimeoutError:
                pass
        att = self.running_attempt() or att
        fr = FaultRecord(kind, round(self.now(), 1), att["phase"], self.steps_done(), bound=SAVE_EVERY)
        n = att["n"]
        if kind == "kill_in_save":
            d = self.ckpt_dir(att["phase"])
            try:
                self.wait_for(lambda: saving(d), 20, "a save")
                fr.note = "during a save"
            except TimeoutError:
                fr.note = "no save seen in 20s; killed between saves"
            fr.step = self.steps_done()
            fr.bound = 2 * SAVE_EVERY  # the loop runs at most one save ahead of the write in flight
            os.killpg(att["pgid"], signal.SIGKILL)
        elif kind == "kill_trainer":
            os.killpg(att["pgid"], signal.SIGKILL)
        elif kind == "stop_trainer":
            os.kill(att["pid"], signal.SIGSTOP)
        elif kind == "kill_daemon":
            self.daemon.kill()
            self.daemon.wait()
            fr.bound = 0  # the survivor is stopped gracefully: an emergency checkpoint, nothing lost
            self.start_daemon()
        elif kind == "torn_checkpoint":
            d = self.ckpt_dir(att["phase"])
            newest = layout.latest_complete(d)
            if newest is None:
                fr.note = "no checkpoint yet; plain kill"
            else:
                model = layout.model_path(d, newest)
                os.truncate(model, model.stat().st_size // 2)
                self.torn.add((att["phase"], newest, n))
                fr.note = f"cut model_{newest:06d}.pt in half"
                fr.bound = 2 * SAVE_EVERY  # the checkpoint before the torn one is the newest usable
            os.killpg(att["pgid"], signal.SIGKILL)
        elif kind == "disk_full":
            return self.fill_disk(fr)
        elif kind == "bad_files":
            return self.drop_bad_files(fr)
        new = self.wait_for(lambda: self.stepping_attempt(after_n=n) or self.finished(), 180, f"recovery from {kind}")
        fr.took = round(self.now() - fr.at, 1)
        if new is True:  # the phase's last step landed as the fault did: nothing left to relaunch
            fr.recovery, fr.lost = f"the job finished ({self.record().get('state')})", 0
            return fr
        fr.recovery = f"attempt {new['n']} resumed from step {new.get('resumed_from')}"
        # the ended attempt's last step as its whole log says (progress on record lags by up to 0.5 s)
        ended = self.record().get("attempts", [])[n - 1]
        fr.step = ended.get("last_step") if ended.get("last_step") is not None else fr.step
        if new["phase"] == fr.phase and fr.step is not None:
            fr.lost = max(0, fr.step - (new.get("resumed_from") or 0))
        return fr

    def fill_disk(self, fr: FaultRecord) -> FaultRecord:
        if not self.tmpfs:  # not scheduled without one (schedule); kept for a direct call
            fr.note, fr.took, fr.recovery, fr.landed = "skipped: no small filesystem (needs root and mount)", 0.0, "-", False
            return fr
        ballast = self.ckpt_root / "ballast"
        free = shutil.disk_usage(self.ckpt_root).free
        # real blocks (a sparse file takes no space), leaving less than one checkpoint free
        subprocess.run(["dd", "if=/dev/zero", f"of={ballast}", "bs=1M", f"count={max(1, (free - 1_000_000) >> 20)}"],
                       capture_output=True)
        try:
            self.wait_for(lambda: self.record().get("state") in ("paused", "waiting"), 60, "a pause for disk")
            fr.recovery = self.record().get("reason", "")[:60]
        except TimeoutError:
            fr.note = "the job never paused"
            fr.landed = not self.finished()   # a job that ended first had no save left to pause before
        time.sleep(2)
        ballast.unlink()
        freed_at = self.now()
        step = self.steps_done() or 0
        self.wait_for(lambda: self.finished() or (self.record().get("state") == "running"
                                                  and (self.steps_done() or 0) > step), 120,
                      "resumption after disk space returned")
        fr.took = round(self.now() - freed_at, 1)
        fr.note = (fr.note + "; " if fr.note else "") + "took = space returned -> stepping again"
        fr.lost, fr.bound = 0, 0
        return fr

    def drop_bad_files(self, fr: FaultRecord) -> FaultRecord:
        inbox = self.home / "jobs"
        for name, content in BAD_FILES.items():
            (inbox / f".{name}.tmp").write_bytes(content)
            os.replace(inbox / f".{name}.tmp", inbox / name)
        self.wait_for(lambda: all((inbox / f"{n}.rejected").exists() for n in BAD_FILES), 30, "rejections")
        fr.took = round(self.now() - fr.at, 1)
        fr.recovery = f"{len(BAD_FILES)} files rejected with a reason; daemon alive: {self.daemon.poll() is None}"
        fr.lost, fr.bound = 0, 0
        return fr


def saving(ckpt_dir: Path) -> bool:
    """A checkpoint is being written: a hidden temp file, or a newest step without its meta yet."""
    try:
        if any(layout.is_temp(p) for p in ckpt_dir.iterdir()):
            return True
    except OSError:
        return False
    steps = layout.list_steps(ckpt_dir)
    return bool(steps) and steps[-1] != layout.latest_complete(ckpt_dir)
