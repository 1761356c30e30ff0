"""Compare the weights of two model checkpoint files: `python -m trainer.compare A.pt B.pt`.

Prints one JSON line {"equal": bool, "max_abs_diff": float, "tensors": N,
"differing": [names]} and exits 0 when bitwise equal, 1 when not, 2 when a file
cannot be read. The drill (`nanod drill`) uses it, since the daemon side never
imports torch; a person can use it to check two runs agree.
"""
from __future__ import annotations

import json
import sys


def compare_state_dicts(a: dict, b: dict) -> dict:
    import torch

    differing, max_diff = [], 0.0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            differing.append(name)
            max_diff = float("inf")
            continue
        ta, tb = a[name], b[name]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            differing.append(name)
            max_diff = float("inf")
        elif not torch.equal(ta, tb):
            differing.append(name)
            max_diff = max(max_diff, (ta.double() - tb.double()).abs().max().item())
    return {"equal": not differing, "max_abs_diff": max_diff, "tensors": len(a), "differing": differing[:10]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m trainer.compare MODEL_A.pt MODEL_B.pt", file=sys.stderr)
        return 2
    import torch

    try:
        a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in argv)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same answer
        print(f"compare: cannot read a checkpoint: {e}".splitlines()[0], file=sys.stderr)
        return 2
    result = compare_state_dicts(a, b)
    print(json.dumps(result))
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
