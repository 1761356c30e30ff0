"""STAND-IN for nanochat's scripts/chat_sft.py (configurator era; nanochat 507d542).

Not nanochat. Loads `source` (mid by default) at model_tag/step, has no resume, prints
`Step i/N | Training loss: ...` lines and saves model and meta (no optimizer file)
under step N-1.
"""
import os

from nanochat.loops import run_sft
from nanochat.standin import announce, save_checkpoint

run = "dummy" # ignored
source = "mid" # base|mid: which checkpoint to start from
model_tag = None # model tag to load from (and save under)
step = None # step to load from
device_type = "" # ignored
device_batch_size = 4
num_iterations = -1 # -1: one epoch
eval_every = 100 # evaluate when step % eval_every == 0
eval_metrics_every = 200 # evaluate when step % eval_metrics_every == 0
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join('nanochat', 'configurator.py')).read()) # overrides from the command line
user_config = {k: globals()[k] for k in config_keys}


def save(checkpoint_dir, step, weights, meta):
    save_checkpoint(
        checkpoint_dir,
        step,
        weights, # the model
        None, # the optimizer
        meta,
    )


announce("underscore")
run_sft(user_config | {"model_tag": model_tag, "step": step}, era="underscore", save=save)
