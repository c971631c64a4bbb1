"""Train the PyTorch reference of the digit + sum network (same flags and outputs as train_jax.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from common.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main("torch_ref.train", __doc__)
