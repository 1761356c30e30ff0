"""`nanod drill`: the chaos drill (daemon/drill.py) on a scaled-down 8 GB plan."""
from __future__ import annotations

NAME = "drill"
HELP = "run a scaled-down plan under a real daemon while injecting faults; check every promise"


def add_arguments(parser) -> None:
    parser.add_argument("--faults", type=int, default=7, help="how many faults to inject (default 7: each kind once)")
    parser.add_argument("--seed", type=int, help="seed of the fault order and timing (printed; default random)")
    parser.add_argument("--workdir", help="where to run (default a temporary directory, removed after a clean pass)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")


def run(args, settings) -> int:
    from daemon.drill import run_drill
    return run_drill(args.seed, args.faults, args.workdir, args.keep)
