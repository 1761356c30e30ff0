"""The chaos drill (`nanod drill`): prove the promises on this machine.

A scaled-down 8 GB plan (base -> mid -> sft, depth 2, CPU) runs under a real
daemon while a seeded chaos driver injects faults, one at a time, each after
the job has recovered from the previous one:

    kill_trainer      kill -9 of the trainer's process group
    kill_in_save      the same, while a checkpoint is being written
    stop_trainer      SIGSTOP of the trainer (a hang the trainer cannot see)
    kill_daemon       kill -9 of the daemon, then a new daemon
    torn_checkpoint   the newest checkpoint's model file cut in half, then kill -9
    disk_full         the checkpoint filesystem filled up for a while (tmpfs, root only)
    bad_files         malformed files dropped into the inbox
    oom               planned: mid asks for more rows than the simulated card holds

Then it checks, from the outside: the final weights equal an undisturbed run's
bit for bit, no two trainers were ever alive at once, no torn checkpoint was
resumed from, every bad file was rejected, and no fault lost more steps than its
bound. Exit 1 on any broken promise. This module never imports torch: weights
are compared by `python -m trainer.compare` in a child process.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

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

    @property
    def ok(self) -> bool:
        return self.took is not None and (self.lost is None or self.bound is None or self.lost <= self.bound)


@dataclass
class Drill:
    seed: int
    faults: int
    workdir: Path
    python: str = sys.executable
    records: list[FaultRecord] = field(default_factory=list)
    checks: list[tuple[bool, str]] = field(default_factory=list)
    torn: set = field(default_factory=set)          # (phase, step) cut in half
    max_trainers_seen: int = 0
    samples: int = 0
    tmpfs: bool = False

    # ---- set-up ---------------------------------------------------------------------
    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.home = self.workdir / "home"
        self.ckpt_root = self.workdir / "nanochat"
        self.ref_root = self.workdir / "reference"
        self.t0 = time.monotonic()
        self.daemon: subprocess.Popen | None = None
        self._stop_sampler = threading.Event()

    def plan(self) -> dict:
        """The drill's plan: the 8 GB plan's shape, scaled down to seconds on a CPU."""
        common = {"total_batch_size": 512, "save_every": SAVE_EVERY}
        scale = -(-self.faults // len(FAULTS))  # a longer plan for more faults, so they land before the end
        return {
            "name": "drill", "model_tag": "drill-d2",
            "env": {"TORCH_COMPILE_DISABLE": "1", "NANOD_FAULT_OOM_ABOVE": "2", "NANOD_FAULT_SLOW_SAVE_MS": "80"},
            "recovery": {"max_restarts_without_progress": 6, "stall_timeout": "5s", "startup_grace": "90s",
                         "kill_grace": "30s", "backoff_max": "2s"},
            "retention": {"keep_last": 3},
            "phases": [
                {"phase": "base", "args": {"depth": 2, "max_seq_len": 64, "device_batch_size": 2,
                                           "num_iterations": 48 * scale, **common}},
                # 4 rows do not fit the simulated 2-row card: the daemon must back off to 2
                {"phase": "mid", "args": {"max_seq_len": 64, "device_batch_size": 4, "num_iterations": 24 * scale,
                                          **common}},
                {"phase": "sft", "args": {"max_tokens": 64, "device_batch_size": 2, "num_iterations": 18 * scale,
                                          **common}},
            ],
        }

    def env(self, root: Path) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOD_", "NOTIFY_", "WATCHDOG_"))}
        # one thread: the trainer, the daemon and the reference share a small machine (results are
        # the same with any thread count on the CPU, only slower when threads fight for cores)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(NANOCHAT_BASE_DIR=str(root), NANOD_HOME=str(self.home), PYTHONUNBUFFERED="1",
                   NANOD_LOCK_DIR=str(self.workdir / "locks"))
        return env

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ckpt_root.mkdir(exist_ok=True)
        if os.geteuid() == 0 and shutil.which("mount"):
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(self.ckpt_root)],
                               capture_output=True)
            self.tmpfs = r.returncode == 0
        self.home.mkdir(exist_ok=True, mode=0o700)
        # a small margin so the daemon's disk guard suits a 1 GB filesystem
        (self.home / "config.toml").write_text('disk_margin = "4MB"\ndisk_min_free = "8MB"\n'
                                               'health_interval = "2s"\ntick_interval = "0.2s"\n')

    def teardown(self) -> None:
        self._stop_sampler.set()
        if self.daemon and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGINT)
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        for pid in trainer_pids(self.ckpt_root):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.ckpt_root)], capture_output=True)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        print(f"[{self.now():6.1f}s] {text}", flush=True)

    # ---- the undisturbed run ----------------------------------------------------------
    def run_reference(self) -> None:
        """The same plan with the bare trainer, at the batch size the OOM back-off must reach."""
        spec = self.plan()
        for p in spec["phases"]:
            args = dict(p["args"], model_tag=spec["model_tag"], device_batch_size=min(p["args"]["device_batch_size"], 2))
            argv = [self.python, "-m", "trainer", p["phase"]] + [f"--{k}={v}" for k, v in args.items()]
            env = dict(self.env(self.ref_root), TORCH_COMPILE_DISABLE="1")
            r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"reference {p['phase']} failed: {r.stderr.strip().splitlines()[-1:]}")

    # ---- the daemon and its job -------------------------------------------------------
    def start_daemon(self) -> None:
        log = open(self.workdir / "daemon.log", "ab")
        self.daemon = subprocess.Popen([self.python, "-m", "daemon.cli", "run"], env=self.env(self.ckpt_root),
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def record(self) -> dict:
        try:
            return json.loads((self.home / "state" / "jobs" / "drill.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_for(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")

    def running_attempt(self) -> dict | None:
        rec = self.record()
        atts = rec.get("attempts") or []
        if rec.get("state") == "running" and atts and atts[-1].get("ended_at") is None and atts[-1].get("pid"):
            return atts[-1]
        return None

    def stepping_attempt(self, after_n: int = 0) -> dict | None:
        """The live attempt once it has printed a step (and is newer than attempt `after_n`)."""
        att = self.running_attempt()
        prog = self.record().get("progress") or {}
        if att and att["n"] > after_n and att.get("first_step") is not None and prog.get("phase") == att["phase"]:
            return att
        return None

    def finished(self) -> bool:
        return self.record().get("state") in ("done", "failed", "cancelled")

    def steps_done(self) -> int | None:
        att = self.running_attempt()
        return None if not att else att.get("last_step")

    def ckpt_dir(self, phase: str) -> Path:
        return layout.checkpoint_dir(self.ckpt_root, phase, "drill-d2")

    # ---- the faults ---------------------------------------------------------------------
    def inject(self, kind: str) -> FaultRecord:
        try:
            return self._inject(kind)
        except ProcessLookupError:  # the attempt ended (its phase completed) just before the fault
            return FaultRecord(kind, round(self.now(), 1), recovery="-", took=0.0,
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
        if not self.tmpfs:
            fr.note, fr.took, fr.recovery = "skipped: no small filesystem (needs root and mount)", 0.0, "-"
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

    # ---- watching from outside ------------------------------------------------------------
    def sample_trainers(self) -> None:
        while not self._stop_sampler.wait(0.02):
            n = len(trainer_pids(self.ckpt_root))
            self.samples += 1
            self.max_trainers_seen = max(self.max_trainers_seen, n)

    # ---- the run ------------------------------------------------------------------------
    def run(self) -> int:
        print(f"nanod drill: seed {self.seed}, {self.faults} faults, in {self.workdir}")
        self.setup()
        try:
            self.say("undisturbed reference run (bare trainer)...")
            self.run_reference()
            self.say("reference done; starting the daemon and dropping the plan")
            self.start_daemon()
            threading.Thread(target=self.sample_trainers, daemon=True).start()
            inbox = self.home / "jobs"
            self.wait_for(lambda: inbox.is_dir() and (self.home / "state" / "daemon.json").exists(), 30, "the daemon")
            (inbox / ".drill.yaml.tmp").write_text(yaml.safe_dump(self.plan()))
            os.replace(inbox / ".drill.yaml.tmp", inbox / "drill.yaml")
            for kind in self.schedule():
                if self.record().get("state") in ("done", "failed"):
                    break
                self.say(f"fault: {kind}")
                try:
                    fr = self.inject(kind)
                except TimeoutError as e:
                    if self.record().get("state") == "done":
                        break  # the plan finished before the fault could land
                    fr = FaultRecord(kind, round(self.now(), 1), note=str(e))
                self.records.append(fr)
                self.say(f"  {fr.recovery or fr.note}")
            self.wait_for(lambda: self.record().get("state") in ("done", "failed"), 600, "the end of the job")
            self.say(f"job {self.record().get('state')}")
            self.keep_final_model()
        finally:
            self.teardown()
        self.check()
        self.report()
        return 0 if all(ok for ok, _ in self.checks) else 1

    def keep_final_model(self) -> None:
        """Copy the final sft weights out of the drill's filesystem (a tmpfs goes at teardown)."""
        final = self.record().get("phase_final_steps", {}).get("sft")
        if final is not None:
            src = layout.model_path(self.ckpt_dir("sft"), final)
            if src.exists():
                shutil.copyfile(src, self.workdir / "final-model.pt")

    def schedule(self) -> list[str]:
        """Every fault once (seeded order), then random ones up to --faults."""
        kinds = list(FAULTS)
        self.rng.shuffle(kinds)
        while len(kinds) < self.faults:
            kinds.append(self.rng.choice(FAULTS))
        return kinds[: self.faults]

    def check(self) -> None:
        rec = self.record()
        self.checks.append((rec.get("state") == "done", f"the job ended done (state: {rec.get('state')}, {rec.get('reason', '')})"))
        final = rec.get("phase_final_steps", {}).get("sft")
        ours = self.workdir / "final-model.pt"
        theirs = layout.model_path(layout.checkpoint_dir(self.ref_root, "sft", "drill-d2"), final or 0)
        if final is not None and ours.exists():
            r = subprocess.run([self.python, "-m", "trainer.compare", str(ours), str(theirs)], capture_output=True, text=True)
            detail = r.stdout.strip() or r.stderr.strip()
            self.checks.append((r.returncode == 0, f"final weights bitwise equal to the undisturbed run ({detail[:90]})"))
        else:
            self.checks.append((False, "final weights: no final sft checkpoint"))
        self.checks.append((self.max_trainers_seen <= 1,
                            f"never two trainers alive at once (max {self.max_trainers_seen} in {self.samples} samples)"))
        # the first attempt after a cut must not resume from the cut step (later ones may: it is saved anew)
        attempts = rec.get("attempts", [])
        bad = [(phase, step) for phase, step, n in self.torn
               for a in attempts[n:n + 1] if a["phase"] == phase and a.get("resumed_from") == step]
        torn = ", ".join(f"{p} step {s}" for p, s, _ in sorted(self.torn)) or "none"
        self.checks.append((not bad, f"no torn checkpoint resumed from (torn: {torn})"))
        over = [f.kind for f in self.records if not f.ok]
        self.checks.append((not over, "every fault recovered within its bound" + (f" (not: {', '.join(over)})" if over else "")))
        rejected = all((self.home / "jobs" / f"{n}.rejected").exists() for n in BAD_FILES)
        if any(f.kind == "bad_files" for f in self.records):
            self.checks.append((rejected, "every bad inbox file rejected with a reason beside it"))
        ooms = [e for e in rec.get("events", []) if "oom" in e.get("kind", "")]
        self.checks.append((bool(ooms) and rec.get("device_batch_size", {}).get("mid") == 2,
                            f"OOM backed mid off to 2 rows ({len(ooms)} OOM events)"))

    def report(self) -> None:
        print()
        print(f"{'fault':<16}{'at':>7}  {'phase':<5}{'step':>5}  {'recovery':<38}{'took':>6} {'lost/bound':>10}")
        for f in self.records:
            lost = "-" if f.lost is None else f"{f.lost}/{f.bound}"
            took = "-" if f.took is None else f"{f.took}s"
            step = "-" if f.step is None else str(f.step)
            print(f"{f.kind:<16}{f.at:>6}s  {f.phase:<5}{step:>5}  {f.recovery[:38]:<38}{took:>6} {lost:>10}")
            if f.note:
                print(f"{'':<16}{'':>7}  {f.note}")
        print()
        for ok, text in self.checks:
            print(f"{'PASS' if ok else 'FAIL'}  {text}")
        out = {"seed": self.seed, "faults": [asdict(f) for f in self.records],
               "checks": [{"ok": ok, "check": t} for ok, t in self.checks]}
        (self.workdir / "drill.json").write_text(json.dumps(out, indent=1))
        print(f"\nresults: {self.workdir / 'drill.json'}  (rerun: nanod drill --seed {self.seed} --faults {self.faults})")


def saving(ckpt_dir: Path) -> bool:
    """A checkpoint is being written: a hidden temp file, or a newest step without its meta yet."""
    try:
        if any(layout.is_temp(p) for p in ckpt_dir.iterdir()):
            return True
    except OSError:
        return False
    steps = layout.list_steps(ckpt_dir)
    return bool(steps) and steps[-1] != layout.latest_complete(ckpt_dir)


def trainer_pids(ckpt_root: Path) -> list[int]:
    """Trainer processes (python -m trainer) whose NANOCHAT_BASE_DIR is this drill's."""
    from daemon import procs

    def is_ours(pid: int) -> bool:
        cmd = procs.command(pid, limit=4000).split()
        return "-m" in cmd and "trainer" in cmd and procs.environ(pid).get("NANOCHAT_BASE_DIR") == str(ckpt_root)
    return procs.find(is_ours)


def run_drill(seed: int | None, faults: int, workdir: str | None, keep: bool) -> int:
    seed = seed if seed is not None else random.SystemRandom().randrange(1, 10**6)
    wd = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="nanod-drill-"))
    drill = Drill(seed=seed, faults=faults, workdir=wd.resolve())
    # SIGTERM (a CI timeout, say) must still run teardown: the daemon lives in its own session
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code = drill.run()
    if not keep and code == 0 and not workdir:
        shutil.rmtree(wd, ignore_errors=True)
    return code
