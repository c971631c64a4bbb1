"""Train the digit + sum network with JAX/Flax."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from common.cli import launch, run_main  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg = launch(argv, __doc__)
    from jax_impl.train import run  # after the flags: --help and a bad flag answer before the framework loads

    run(cfg)


if __name__ == "__main__":
    run_main(main)
