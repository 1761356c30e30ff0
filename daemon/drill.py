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

The plan is sized for the faults asked for: a short bare run first measures
this machine's step time, and the plan gets enough steps for every fault to
land before it ends, even back to back (each fault lets the trainer step for
a few seconds and redo what it lost); the faults are then spread over the
whole plan, so every phase gets its share, and sft gets a quarter more steps
after them as slack for faults that come late. Faults that cannot be injected here are left out of the
schedule (disk_full needs root and mount for a small filesystem) and the
report counts what landed, with the reason for any fault that did not.

Then it checks, from the outside: the final weights equal an undisturbed run's
bit for bit, no two trainers were ever alive at once, no torn checkpoint was
resumed from, every bad file was rejected, and no fault lost more steps than its
bound. Exit 1 on any broken promise. This module never imports torch: weights
are compared by `python -m trainer.compare` in a child process.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
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

from daemon.drill_faults import BAD_FILES, FAULTS, SAVE_EVERY, FaultRecord, Faults
from trainer import layout

PLAN_UNIT = (48, 24, 18)   # base, mid, sft steps of the smallest plan; a bigger one is a multiple
# Wall seconds one fault lets the trainer step: the drill's pause before a fault (0.3-1.5 s), a killed
# daemon's survivor stepping until the new daemon stops it (~2 s), the record's lag. Measured in 24-fault
# drills, steps included that lost work made it redo: 1.1 s a fault on a quiet machine (22 steps at
# ~50 ms), 1.7 s on a loaded one (16 at ~110 ms). With save_every steps of redo on top, the plan has
# 1.6-2x what the faults used there.
FAULT_STEPPING_S = 2.0
CALIBRATION_STEPS = 10
# Slack after the faults: sft gets this share of the plan's nominal length on top. The faults are
# spread over the nominal plan, so a late one (a fault that took longer than its spacing pushes the
# rest) still finds steps left; measured: without it, 20 of 24 landed, the last ones piled up at the end.
TAIL_SHARE = 0.25


@dataclass
class Drill(Faults):
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
    step_seconds: float | None = None   # one optimizer step of the plan, bare, as measured here (calibrate)

    # ---- set-up ---------------------------------------------------------------------
    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.home = self.workdir / "home"
        self.ckpt_root = self.workdir / "nanochat"
        self.ref_root = self.workdir / "reference"
        self.t0 = time.monotonic()
        self.daemon: subprocess.Popen | None = None
        self._stop_sampler = threading.Event()

    def scale(self) -> int:
        """How many PLAN_UNITs the plan needs so that every fault lands before the job ends."""
        step_s = self.step_seconds or 0.05
        per_fault = math.ceil(FAULT_STEPPING_S / step_s) + SAVE_EVERY   # stepping, and the lost steps redone
        return max(1, math.ceil(self.faults * per_fault / sum(PLAN_UNIT)))

    def plan(self) -> dict:
        """The drill's plan: the 8 GB plan's shape, scaled down to seconds on a CPU."""
        common = {"total_batch_size": 512, "save_every": SAVE_EVERY}
        scale = self.scale()
        base, mid, sft = (n * scale for n in PLAN_UNIT)
        sft += math.ceil(TAIL_SHARE * self.nominal_steps())
        return {
            "name": "drill", "model_tag": "drill-d2",
            "env": {"TORCH_COMPILE_DISABLE": "1", "NANOD_FAULT_OOM_ABOVE": "2", "NANOD_FAULT_SLOW_SAVE_MS": "80"},
            "recovery": {"max_restarts_without_progress": 6, "stall_timeout": "5s", "startup_grace": "90s",
                         "kill_grace": "30s", "backoff_max": "2s"},
            "retention": {"keep_last": 3},
            "phases": [
                {"phase": "base", "args": {"depth": 2, "max_seq_len": 64, "device_batch_size": 2,
                                           "num_iterations": base, **common}},
                # 4 rows do not fit the simulated 2-row card: the daemon must back off to 2
                {"phase": "mid", "args": {"max_seq_len": 64, "device_batch_size": 4, "num_iterations": mid,
                                          **common}},
                {"phase": "sft", "args": {"max_tokens": 64, "device_batch_size": 2, "num_iterations": sft,
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
    def calibrate(self) -> float:
        """Seconds per optimizer step of the plan's base phase, bare, on this machine now (median)."""
        args = dict(self.plan_args("base"), num_iterations=CALIBRATION_STEPS, save_every=-1,
                    model_tag="drill-calibrate")
        argv = [self.python, "-m", "trainer", "base"] + [f"--{k}={v}" for k, v in args.items()]
        r = subprocess.run(argv, env=dict(self.env(self.ref_root), TORCH_COMPILE_DISABLE="1"),
                           capture_output=True, text=True)
        shutil.rmtree(layout.checkpoint_dir(self.ref_root, "base", "drill-calibrate"), ignore_errors=True)
        dts = sorted(float(m) / 1000 for m in re.findall(r"\| dt: ([\d.]+)ms", r.stdout)[2:])
        if r.returncode != 0 or not dts:
            raise RuntimeError(f"calibration run failed: {r.stderr.strip().splitlines()[-1:]}")
        return dts[len(dts) // 2]

    def plan_args(self, phase: str) -> dict:
        return next(p["args"] for p in self.plan()["phases"] if p["phase"] == phase)

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
            self.say("measuring this machine's step time (bare trainer)...")
            self.step_seconds = self.calibrate()
            steps = sum(p["args"]["num_iterations"] for p in self.plan()["phases"])
            self.say(f"{self.step_seconds * 1000:.0f} ms a step: a plan of {steps} steps for {self.faults} faults")
            self.say("undisturbed reference run (bare trainer)...")
            self.run_reference()
            self.say("reference done; starting the daemon and dropping the plan")
            self.start_daemon()
            threading.Thread(target=self.sample_trainers, daemon=True).start()
            inbox = self.home / "jobs"
            self.wait_for(lambda: inbox.is_dir() and (self.home / "state" / "daemon.json").exists(), 30, "the daemon")
            (inbox / ".drill.yaml.tmp").write_text(yaml.safe_dump(self.plan()))
            os.replace(inbox / ".drill.yaml.tmp", inbox / "drill.yaml")
            for i, kind in enumerate(self.schedule()):
                if self.record().get("state") in ("done", "failed"):
                    break
                try:
                    self.wait_for(lambda: self.finished() or self.steps_into_plan() >= self.due_step(i),
                                  1800, f"step {self.due_step(i)} of the plan")
                except TimeoutError:
                    pass   # late: the fault goes in now and its recovery says how the job is
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

    def nominal_steps(self) -> int:
        """The plan's length before the tail: what the faults are spread over."""
        return sum(PLAN_UNIT) * self.scale()

    def due_step(self, i: int) -> int:
        """Fault i waits for this many steps into the whole plan: the faults are spread over every
        phase (the plan has room for all of them back to back, and the tail after them)."""
        return self.nominal_steps() * i // self.faults

    def steps_into_plan(self) -> int:
        """Steps the job has done over its whole plan: earlier phases' lengths plus this phase's progress."""
        rec = self.record()
        phases = self.plan()["phases"]
        i = min(rec.get("phase_index", 0), len(phases))
        prog = rec.get("progress") or {}
        here = (prog.get("step") or 0) if i < len(phases) and prog.get("phase") == phases[i]["phase"] else 0
        return sum(p["args"]["num_iterations"] for p in phases[:i]) + here

    def kinds(self) -> tuple[str, ...]:
        """The fault kinds that can be injected here: disk_full needs the small filesystem."""
        return tuple(k for k in FAULTS if k != "disk_full" or self.tmpfs)

    def schedule(self) -> list[str]:
        """Every injectable fault once (seeded order), then random ones up to --faults."""
        kinds = list(self.kinds())
        self.rng.shuffle(kinds)
        while len(kinds) < self.faults:
            kinds.append(self.rng.choice(self.kinds()))
        return kinds[: self.faults]

    def injected_line(self) -> str:
        """How many faults landed of those asked for, and why any did not."""
        landed = sum(f.landed for f in self.records)
        why = [f"{f.kind}: {f.note}" for f in self.records if not f.landed]
        if len(self.records) < self.faults:
            why.append(f"{self.faults - len(self.records)} never tried: the job ended first (the faults "
                       "before them took more steps than the plan allowed for)")
        if "disk_full" not in self.kinds():
            why.append("disk_full not scheduled: it needs root and mount for a small filesystem")
        return f"faults injected: {landed} of {self.faults}" + (f" ({'; '.join(why)})" if why else "")

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
        print(self.injected_line())
        for ok, text in self.checks:
            print(f"{'PASS' if ok else 'FAIL'}  {text}")
        out = {"seed": self.seed, "faults_asked": self.faults, "step_seconds": self.step_seconds,
               "plan_steps": sum(p["args"]["num_iterations"] for p in self.plan()["phases"]), "injected": self.injected_line(),
               "faults": [asdict(f) for f in self.records],
               "checks": [{"ok": ok, "check": t} for ok, t in self.checks]}
        (self.workdir / "drill.json").write_text(json.dumps(out, indent=1))
        print(f"\nresults: {self.workdir / 'drill.json'}  (rerun: nanod drill --seed {self.seed} --faults {self.faults})")


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
