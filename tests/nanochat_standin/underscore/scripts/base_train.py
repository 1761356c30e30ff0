"""STAND-IN for nanochat's scripts/base_train.py (configurator era; nanochat 507d542).

Not nanochat. Globals overridden by --key=value (underscore names). Note the era's
trap: eval_every and sample_every of -1 mean *every step* here (step % -1 == 0).
"""
import os

from nanochat.loops import run_base
from nanochat.standin import announce, save_checkpoint

run = "dummy" # wandb run name (ignored)
device_type = "" # ignored
depth = 20 # model depth
max_seq_len = 2048 # context length
num_iterations = -1 # optimizer steps (-1: from the ratio)
target_param_data_ratio = 20 # steps = ratio * depth here
device_batch_size = 32 # per-device batch size
total_batch_size = 524288 # tokens per step
matrix_lr = 0.02 # ignored
resume_from_step = -1 # resume from this step (-1: no)
eval_every = 250 # evaluate when step % eval_every == 0
core_metric_every = 2000 # -1 disables
sample_every = 2000 # sample when step % sample_every == 0
save_every = -1 # -1: only at the end
model_tag = "" # checkpoint folder name (default d<depth>)
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join('nanochat', 'configurator.py')).read()) # overrides from the command line
user_config = {k: globals()[k] for k in config_keys}


def save(checkpoint_dir, step, weights, meta):
    save_checkpoint(
        checkpoint_dir,
        step,
        weights, # the model
        {"momentum": weights}, # the optimizer
        meta,
        rank=int(os.environ.get("RANK", 0)),
    )


announce("underscore")
run_base(user_config, era="underscore", save=save)
