"""The batch script of one SLURM attempt: its #SBATCH lines and the bash that runs the trainer.

Every option is an `#SBATCH` line, so the file says all there is to know about
the batch job and `sbatch FILE` resubmits it by hand. nanod's own options:

    --requeue            pre-emption, node failure and `scontrol requeue` put the job back in the queue
    --open-mode=append   each run of a requeued job appends to the same attempt log
    --signal=B:USR1@G    G seconds before the time limit, USR1 to this script (only)
    --output=LOG         the attempt's log, which the daemon reads (on the shared filesystem)

Signals, and why each is handled as it is (the trainer saves an emergency
checkpoint on its first SIGTERM and exits at once, saving nothing, on a second):

    USR1  the time limit is near: SIGTERM (and SIGCONT) to the trainer once; when it
          has saved and exited INTERRUPTED, the script requeues its own job, which
          then resumes from that checkpoint. Also when that SIGTERM, and no
          SLURM's own, killed it (143): it came before the trainer's handler was
          in place, or as it exited after its final checkpoint (Python puts
          SIGTERM back to the default at exit); the next run resumes from the
          newest complete checkpoint, the final one included, so such a near miss
          is neither a crash nor a new batch job
    USR2  nanod stops the attempt (a stall, a cancel: `scancel --batch --signal=USR2`):
          SIGTERM to the trainer once, no requeue
    TERM  SLURM itself ends the job (requeue, pre-emption, scancel, time limit): it sends
          SIGTERM to every process of the job, the trainer too, so the script only waits

The trainer always runs with --resume_from_step=auto, so every run of the job,
the first or a requeued one, resumes from the newest complete checkpoint with
no daemon involved. The script's last word is `the trainer exited with code N`,
which the daemon reads back (SLURM's accounting may be off); N is the trainer's
own status when a trapped signal cuts bash's `wait` short as the trainer exits
(the script waits once more for it), except where bash lost it in that race:
then 138, USR1's own, which at a time limit requeues like a 143. This module
only builds text.
"""
from __future__ import annotations

import shlex
from pathlib import Path

EXIT_MARK = "the trainer exited with code "
START_MARK = "run "


def sbatch_options(slurm, *, job_name: str, log: Path, workdir: Path) -> list[str]:
    """The job's sbatch options, nanod's first (the spec refuses those in extra_args)."""
    opts = [f"--job-name={job_name}", f"--output={log}", "--open-mode=append", "--requeue",
            f"--signal=B:USR1@{int(slurm.checkpoint_grace)}", f"--chdir={workdir}", "--export=ALL",
            "--nodes=1", "--ntasks=1"]
    named = (("partition", slurm.partition), ("time", slurm.time), ("account", slurm.account), ("qos", slurm.qos),
             ("gres", slurm.gres), ("gpus-per-node", slurm.gpus_per_node), ("cpus-per-task", slurm.cpus_per_task),
             ("mem", slurm.mem), ("constraint", slurm.constraint))
    opts += [f"--{key}={value}" for key, value in named if value is not None]
    return opts + list(slurm.extra_args)


def render_script(argv: list[str], options: list[str], *, title: str) -> str:
    """The whole batch script: `argv` is the trainer's command (torchrun's for several GPUs)."""
    sbatch = "".join(f"#SBATCH {opt}\n" for opt in options)
    command = " ".join(shlex.quote(a) for a in argv)
    return f"""#!/bin/bash
{sbatch}# {title}
# Written by nanod; `sbatch` this file to run it by hand. See daemon/launchers/slurm_script.py.
set -u
say() {{ echo "# nanod: slurm job ${{SLURM_JOB_ID:-?}} $*"; }}
stop=""        # why the trainer is being stopped: time_limit, nanod, slurm
forwarded=""   # the trainer got its one SIGTERM from this script
ending=""      # SLURM sent its own SIGTERM to the job (a 143 is then not ours alone)
trainer=""
forward() {{
  if [ -n "$trainer" ] && [ -n "$stop" ] && [ "$stop" != slurm ] && [ -z "$forwarded" ]; then
    forwarded=1
    kill -CONT "$trainer" 2>/dev/null
    kill -TERM "$trainer" 2>/dev/null
  fi
}}
trap '[ -z "$stop" ] && stop=time_limit && say "time limit near: SIGTERM to the trainer for its checkpoint"; forward' USR1
trap '[ -z "$stop" ] && stop=nanod && say "stopped by nanod: SIGTERM to the trainer"; forward' USR2
trap 'ending=1; [ -z "$stop" ] && stop=slurm && say "SLURM is ending this run: the trainer has its own SIGTERM"' TERM
say "{START_MARK}$(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) on $(hostname -s), restart count ${{SLURM_RESTART_COUNT:-0}}"
rc=4
if [ -z "$stop" ]; then
  {command} &
  trainer=$!
  forward   # a signal that came between the start and here
  while :; do
    wait "$trainer"
    rc=$?
    kill -0 "$trainer" 2>/dev/null || break   # wait was cut short by a trapped signal: wait again
  done
  # a signal that cut the last wait short as the trainer exited: the shell may still hold its status
  # (127: already reported, rc has it; -1: bash lost it in that race, rc stays 138, USR1's, not the trainer's)
  wait "$trainer" 2>/dev/null
  last=$?
  [ "$last" = 127 ] || [ "$last" = -1 ] || rc=$last
fi
say "{EXIT_MARK}$rc${{stop:+ (stopped: $stop)}}"
# 4: saved and stopped; 143: killed by this script's SIGTERM alone (before its handler, or as it exited);
# 138: it exited as the warning came and bash lost its status. The next run resumes from the newest checkpoint
if [ "$stop" = time_limit ] && {{ [ "$rc" = 4 ] || {{ [ -z "$ending" ] && {{ [ "$rc" = 143 ] || [ "$rc" = 138 ]; }}; }}; }}; then
  say "requeueing itself: the next run resumes from the newest checkpoint"
  if scontrol requeue "$SLURM_JOB_ID"; then
    # wait for SLURM to end this run: a script that exits first can end the job before the requeue lands
    trap 'exit 0' TERM
    sleep 600 &
    wait $!
    exit 0
  fi
  say "scontrol requeue failed: nanod relaunches the attempt"
fi
exit "$rc"
"""
