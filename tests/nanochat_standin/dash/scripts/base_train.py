"""STAND-IN for nanochat's scripts/base_train.py (argparse, dash-style flags; nanochat 92d63d4).

Not nanochat: no torch, no model. Same flags nanod passes, same step lines, saves
and resume behaviour. Run from the checkout root: python -m scripts.base_train
"""
import argparse
import os

from nanochat.loops import run_base
from nanochat.standin import announce, save_checkpoint

parser = argparse.ArgumentParser(description="stand-in for nanochat base pretraining")
parser.add_argument("--run", type=str, default="dummy", help="wandb run name (ignored)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (ignored)")
parser.add_argument("--fp8", action="store_true", help="ignored")
parser.add_argument("--depth", type=int, default=20, help="model depth")
parser.add_argument("--max-seq-len", type=int, default=2048, help="context length")
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the ratio)")
parser.add_argument("--target-param-data-ratio", type=float, default=12, help="steps = ratio * depth here")
parser.add_argument("--device-batch-size", type=int, default=32, help="per-device batch size")
parser.add_argument("--total-batch-size", type=int, default=-1, help="tokens per step (-1: auto)")
parser.add_argument("--matrix-lr", type=float, default=0.02, help="ignored")
parser.add_argument("--resume-from-step", type=int, default=-1, help="resume from this step (-1: no)")
parser.add_argument("--eval-every", type=int, default=250, help="-1 disables")
parser.add_argument("--core-metric-every", type=int, default=2000, help="-1 disables")
parser.add_argument("--sample-every", type=int, default=2000, help="-1 disables")
parser.add_argument("--save-every", type=int, default=-1, help="-1: only at the end")
parser.add_argument("--model-tag", type=str, default=None, help="checkpoint folder name (default d<depth>)")
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
run_base(user_config, save=save)
