"""nanod's compact nanochat-style trainer.

Run it as `python -m trainer {base,mid,sft} --key=value ...`. It knows nothing of
the daemon: they meet through argv, the environment, stdout/stderr, exit codes
(`trainer.exitcodes`) and checkpoint files (`trainer.layout`).

This package's __init__ must stay free of torch: the daemon imports the two
stdlib-only modules `trainer.exitcodes` and `trainer.layout`.
"""
