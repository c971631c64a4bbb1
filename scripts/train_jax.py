"""Train the digit + sum network with JAX/Flax."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from common.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main("jax_impl.train", __doc__)
