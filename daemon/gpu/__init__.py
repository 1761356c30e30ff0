"""The GPU: its lock (lock.py) and its memory readings (vram.py)."""
