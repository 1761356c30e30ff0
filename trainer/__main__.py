"""`python -m trainer {base,mid,sft} --key=value ...`: parse, resolve, train, exit with a code from exitcodes.

(`python -m trainer {sample,chat} ...` talks to a checkpoint instead: trainer/generate.py.)

Bad flags or data print one line (no traceback) and exit BAD_ARGS; out of
memory exits OOM; a stop signal exits INTERRUPTED after the emergency
checkpoint. Anything else is a crash and keeps its traceback.
"""
from __future__ import annotations

import sys

from trainer import exitcodes
from trainer.cli import BadArgs, format_help, parse_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("sample", "chat"):  # talking to a checkpoint, not training: trainer/generate.py
        from trainer.generate import main as generate_main
        return generate_main(argv)
    if not argv or argv[0] in ("-h", "--help", "help") or "--help" in argv or "-h" in argv:
        print(format_help())
        return exitcodes.OK if argv else exitcodes.BAD_ARGS
    try:
        phase, opts, given = parse_args(argv)
    except BadArgs as e:
        return _bad(e)
    # signals are recorded from here on: a stop during setup still ends cleanly
    from trainer.signals import StopFlag, die_with_parent
    if not die_with_parent():
        print("trainer: error: torchrun, which started this rank, is gone", file=sys.stderr, flush=True)
        return exitcodes.INTERRUPTED
    stop = StopFlag().install()
    import torch

    from trainer.data import DataError
    from trainer.distributed import Group
    from trainer.faults import Faults
    from trainer.setup import resolve_plan
    from trainer.train import Trainer
    group = None
    try:
        group = Group.from_env().start(opts.device_type)
        faults = Faults.from_env()
        # rank 0 resolves first (it may generate the embedded data and train the tokenizer), then
        # says whether it refused: its refusal ends every rank with BAD_ARGS at once, rather than
        # leaving them to die of its closed connection and torchrun to name that crash the cause
        if not group.is_main and group.any(False):
            return exitcodes.BAD_ARGS  # rank 0 printed the reason
        try:
            plan = resolve_plan(phase, opts, given, world_size=group.world_size, rank=group.rank)
        except (BadArgs, DataError):
            if group.is_main:
                group.any(True)
            raise
        if group.is_main:
            group.any(False)
        return Trainer(plan, stop, faults, group).run()
    except (BadArgs, DataError, ValueError) as e:
        if isinstance(e, ValueError) and not str(e).startswith(("NANOD_", "RANK=", "WORLD_SIZE=", "LOCAL_RANK=")):
            raise
        return _bad(e)
    except torch.OutOfMemoryError:
        if opts.device_batch_size == "auto":  # the auto-fit line above says what was probed
            print("out of memory before training started: not even device_batch_size 1 fits; a smaller model "
                  "or max_seq_len is needed", file=sys.stderr, flush=True)
        else:
            print(f"out of memory before training started with device_batch_size={opts.device_batch_size}: "
                  "retry with a smaller --device_batch_size", file=sys.stderr, flush=True)
        return exitcodes.OOM
    finally:
        if group is not None:
            group.close()


def _bad(e: Exception) -> int:
    print(f"trainer: error: {e}", file=sys.stderr, flush=True)
    return exitcodes.BAD_ARGS


if __name__ == "__main__":
    sys.exit(main())
