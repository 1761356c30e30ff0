"""STAND-IN for nanochat's scripts/chat_sft.py (argparse, dash-style flags; nanochat 92d63d4).

Not nanochat. Starts from a base checkpoint (--model-tag/--model-step, else the newest
model file, as nanochat does), has no resume, saves model, meta and every rank's
optimizer once, at its last step.
"""
import argparse
import os

from nanochat.loops import run_sft
from nanochat.standin import announce, save_checkpoint

parser = argparse.ArgumentParser(description="stand-in for nanochat SFT")
parser.add_argument("--run", type=str, default="dummy", help="wandb run name (ignored)")
parser.add_argument("--device-type", type=str, default="", help="ignored")
parser.add_argument("--model-tag", type=str, default=None, help="model tag to load from")
parser.add_argument("--model-step", type=int, default=None, help="model step to load from")
parser.add_argument("--load-optimizer", type=int, default=1, help="warm-start the optimizer (0/1)")
parser.add_argument("--num-iterations", type=int, default=-1, help="-1: one epoch")
parser.add_argument("--max-seq-len", type=int, default=None, help="default: inherit")
parser.add_argument("--device-batch-size", type=int, default=None, help="default: inherit")
parser.add_argument("--total-batch-size", type=int, default=None, help="default: inherit")
parser.add_argument("--eval-every", type=int, default=200, help="-1 disables")
parser.add_argument("--chatcore-every", type=int, default=200, help="-1 disables")
args = parser.parse_args()
user_config = vars(args).copy()


def save(checkpoint_dir, step, weights, meta):
    save_checkpoint(
        checkpoint_dir,
        step,
        weights, # the model
        {"momentum": weights}, # the optimizer
        meta,
        rank=int(os.environ.get("RANK", 0)),
    )


announce("dash")
run_sft(user_config, save=save)
