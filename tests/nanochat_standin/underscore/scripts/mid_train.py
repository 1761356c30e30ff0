"""STAND-IN for nanochat's scripts/mid_train.py (configurator era; nanochat 507d542).

Not nanochat. Loads a base checkpoint (model_tag, step; else the newest model file),
has no resume, saves once at the end: model, meta, and rank 0's optimizer only.
"""
import os

from nanochat.loops import run_mid
from nanochat.standin import announce, save_checkpoint

run = "dummy" # ignored
device_type = "" # ignored
model_tag = None # model tag to load from (and save under)
step = None # base step to load from
num_iterations = -1 # -1: one epoch
max_seq_len = 2048
device_batch_size = 32
total_batch_size = 524288
eval_every = 150 # -1 disables
dry_run = 0 # ignored
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join('nanochat', 'configurator.py')).read()) # overrides from the command line
user_config = {k: globals()[k] for k in config_keys}


def save(checkpoint_dir, step, weights, meta):
    save_checkpoint(
        checkpoint_dir,
        step,
        weights, # the model
        [{"momentum": weights}], # the optimizer
        meta,
    )


announce("underscore")
run_mid(user_config | {"model_tag": model_tag, "step": step}, era="underscore", save=save)
