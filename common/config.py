"""One dataclass holds every setting; the CLI of both training scripts is generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, fields

DESIGNS = ("flatten", "digit")


class ConfigError(Exception):
    """An invalid setting; shown as one line, exit code 2."""


@dataclass
class Config:
    # model
    design: str = "flatten"  # where r joins: "flatten" (the assignment's) or "digit" (the adder reads the digit head)
    conv1: int = 32  # channels of the first 3x3 conv
    conv2: int = 64  # channels of the second 3x3 conv
    hidden: int = 256  # width of the fully connected layer
    adder_hidden: int = 64  # width of the adder MLP (design "digit")
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3  # peak learning rate of Adam(W)
    weight_decay: float = 0.0
    warmup_epochs: float = 0.5  # linear warm-up from lr/10, then linear decay to 0
    seed: int = 0
    shift: int = 2  # random translation by up to this many pixels (0: no augmentation)
    label_smoothing: float = 0.0
    sum_weight: float = 1.0  # loss = CE(digit) + sum_weight * CE(sum)
    holdout_pairs: int = 0  # (digit, r) combinations never shown in training (common/data.py: holdout_pairs)
    preset: str = "default"  # a named recipe (PRESETS below) whose values the other flags then override
    # data and outputs
    data_dir: str | None = None
    out: str = "runs/latest"
    dry_run: bool = False
    resume: str | None = None  # RUN_DIR of a stopped run: continue it from its last checkpoint, with its settings
    steps_per_call: int = 16  # training steps fused into one compiled call (JAX): fewer calls, faster steps (benchmarks/)
    # devices, hosts and precision (JAX; checked in jax_impl/distributed.py)
    devices: int = 0  # data-parallel over the first N devices, the batch split across them (0: all devices)
    precision: str = "fp32"  # "fp32", or "bf16": bfloat16 compute, float32 parameters and loss
    coordinator: str | None = None  # HOST:PORT of process 0, to train with several processes (hosts)
    num_processes: int = 1  # with --coordinator: how many processes take part
    process_id: int = 0  # with --coordinator: this process's rank, 0 .. num_processes - 1

    def validate(self) -> "Config":
        positive = ("epochs", "batch_size", "conv1", "conv2", "hidden", "adder_hidden", "steps_per_call")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        for name in ("weight_decay", "warmup_epochs", "shift", "sum_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.shift > 8:
            raise ConfigError(f"--shift {self.shift} would move most digits out of the 28x28 frame (max 8)")
        if self.design not in DESIGNS:
            raise ConfigError(f"--design must be one of {', '.join(DESIGNS)}, got {self.design!r}")
        if not 0 <= self.holdout_pairs <= MAX_HOLDOUT_PAIRS:
            raise ConfigError(f"--holdout-pairs must be in 0..{MAX_HOLDOUT_PAIRS}, got {self.holdout_pairs}")
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.batch_size > 60_000:
            raise ConfigError(f"--batch-size {self.batch_size} is larger than the training set")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MAX_HOLDOUT_PAIRS = 50  # of the 100 pairs; every digit, r and sum must stay in training

# Named recipes, measured in README.md ("Results"): each is a set of overrides of the defaults above.
PRESETS: dict[str, dict] = {
    "default": {},
    # The shortest CPU time to 99.0% test digit and sum: a quarter of the network, 3 epochs, the
    # digit design (its sum is right as soon as its digit is), no augmentation (it slows early
    # epochs), one step per compiled call (compiling 16 costs more than it saves in 3 epochs).
    "fast": {"design": "digit", "conv1": 16, "conv2": 32, "hidden": 128, "epochs": 3, "lr": 3e-3,
             "warmup_epochs": 0.2, "shift": 0, "steps_per_call": 1},
    # The highest test accuracy within about 15 minutes on a 2-core CPU (about 5 here).
    "best": {"design": "digit", "epochs": 30, "label_smoothing": 0.1, "warmup_epochs": 1.0},
}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints the whole usage; one line is kinder
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _flag_type(field: dataclasses.Field):
    kind = str(field.type)
    if "bool" in kind:
        return None
    if "int" in kind:
        return int
    if "float" in kind:
        return float
    return str


def parse_config(argv: list[str] | None, description: str) -> Config:
    """Flags over the chosen --preset over the dataclass defaults."""
    parser = OneLineParser(description=description)
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", default="default")
    name = preset.parse_known_args(argv)[0].preset
    if name not in PRESETS:
        parser.error(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    defaults = dataclasses.replace(Config(), preset=name, **PRESETS[name])
    for f in fields(Config):
        flag = f"--{f.name.replace('_', '-')}"
        if _flag_type(f) is None:
            parser.add_argument(flag, action="store_true", help=f"(default: {getattr(defaults, f.name)})")
        else:
            parser.add_argument(flag, type=_flag_type(f), default=getattr(defaults, f.name), metavar=f.name.upper(), help=f"(default: {getattr(defaults, f.name)})")
    args = parser.parse_args(argv)
    try:
        return Config(**vars(args)).validate()
    except ConfigError as e:
        parser.error(str(e))
    raise AssertionError  # unreachable: parser.error exits
