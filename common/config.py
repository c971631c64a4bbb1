"""One dataclass holds every setting; the command line of both training scripts is generated
from it, and `resolve` turns a command line (and, on --resume, the saved run) into the final
Config that both trainers receive."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from common.errors import ConfigError

DESIGNS = ("flatten", "digit", "numberline")
PADDINGS = ("same", "valid")
TRUNKS = ("plain", "deep")
KERNELS = (3, 5)
PRECISIONS = ("fp32", "bf16")
TORCH_DEVICES = ("auto", "cpu", "cuda")
DATA_SOURCES = ("idx", "tfds")
ACCELERATOR_STEPS_PER_CALL = 16
MAX_SEED = 2**31 - 1  # JAX's and NumPy's seeds both take it; larger ones overflow int32 keys


def setting(default, group: str, help: str, choices: tuple | None = None, low=None, high=None, flag: str | None = None):
    """A Config field with its --help line, its group, and its allowed values (checked by `validate`).
    `flag`: the command-line name where it is not the field's (users' commands keep theirs)."""
    return field(default=default, metadata={"group": group, "help": help, "choices": choices, "low": low, "high": high,
                                            "flag": flag})


# The groups, in the order --help shows them. "model" and "recipe" decide what is trained:
# they cannot change on --resume. The others say where and how this launch runs.
GROUPS = {
    "model": "model (what is trained)",
    "recipe": "recipe (how it is trained)",
    "data": "data",
    "run": "run (outputs, resuming)",
    "devices": "devices and speed",
}
RECIPE_GROUPS = ("model", "recipe")


@dataclass
class Config:
    design: str = setting("flatten", "model", "where r joins: flatten (one-hot r after the conv stack, the assignment's), "
                          "digit (an adder reads the digit head's softmax and one-hot r), or numberline (the digit head's "
                          "decision and r added on a learned number line: generalises to unseen pairs)", choices=DESIGNS)
    conv1: int = setting(32, "model", "channels of the first convolution", low=1, high=1024)
    conv2: int = setting(64, "model", "channels of the second convolution", low=1, high=1024)
    kernel1: int = setting(3, "model", "kernel size of the first convolution (3 or 5)", choices=KERNELS)
    kernel2: int = setting(3, "model", "kernel size of the second convolution (3 or 5)", choices=KERNELS)
    padding: str = setting("same", "model", "padding of both convolutions: same (28x28 -> 7x7 after the two pools) or "
                           "valid (no padding: 5x5 kernels then 3x3 give 5x5, a smaller fc layer)", choices=PADDINGS)
    trunk: str = setting("plain", "model", "the convolutions before the fc layer: plain (conv, pool, conv, pool: the "
                         "assignment's) or deep (two blocks of two 3x3 convolutions with batch norm, each block then "
                         "pooled; --conv1 and --conv2 channels)", choices=TRUNKS)
    hidden: int = setting(256, "model", "width of the fully connected layer", low=1, high=16384)
    adder_hidden: int = setting(64, "model", "width of the adder's hidden layer (design digit)", low=1, high=16384)
    preset: str = setting("default", "recipe", "a named recipe; any flag given beside it wins",
                          choices=None)  # checked against PRESETS below; --help lists what each sets
    epochs: int = setting(10, "recipe", "passes over the 60,000 training images", low=1, high=10_000)
    batch_size: int = setting(128, "recipe", "images per training step (over all devices)", low=1, high=60_000)
    lr: float = setting(2e-3, "recipe", "peak learning rate of AdamW", low=0.0, high=10.0)
    weight_decay: float = setting(0.0, "recipe", "AdamW's decoupled weight decay", low=0.0, high=10.0)
    beta1: float = setting(0.9, "recipe", "AdamW's decay of the gradient's running mean", low=0.0, high=0.9999)
    beta2: float = setting(0.999, "recipe", "AdamW's decay of the squared gradient's running mean", low=0.0, high=0.99999)
    warmup_epochs: float = setting(0.5, "recipe", "linear warm-up from lr/10 over this many epochs, then linear decay to 0",
                                   low=0.0, high=10_000.0)
    seed: int = setting(0, "recipe", f"seed of the initial weights, each image's r and the batch order (0..{MAX_SEED})",
                        low=0, high=MAX_SEED)
    shift: int = setting(2, "recipe", "random translation of each training image by up to this many pixels (0: none)",
                         low=0, high=8)
    rotate: float = setting(0.0, "recipe", "random rotation of each training image by up to this many degrees "
                            "(bilinear, on the device; 0: none)", low=0.0, high=45.0)
    scale: float = setting(0.0, "recipe", "random scaling of each training image by a factor in 1 +- SCALE (0: none)",
                           low=0.0, high=0.5)
    elastic: float = setting(0.0, "recipe", "elastic distortion of each training image: every pixel moved by a smooth "
                             "random field of up to ELASTIC pixels (on the device; 0: none)", low=0.0, high=8.0)
    ema: float = setting(0.0, "recipe", "evaluate and predict with an exponential moving average of the weights "
                         "(and batch-norm statistics) of this decay per step, e.g. 0.999 (0: off, the trained weights)",
                         low=0.0, high=0.99999)
    label_smoothing: float = setting(0.0, "recipe", "label smoothing of both cross-entropies, in [0, 1)", low=0.0, high=1.0)
    sum_weight: float = setting(1.0, "recipe", "loss = CE(digit) + SUM_WEIGHT * CE(sum)", low=0.0, high=100.0)
    holdout_pairs: int = setting(0, "recipe", "keep this many (digit, r) pairs out of training, to test unseen "
                                 "combinations (0..50)", low=0, high=50)
    precision: str = setting("fp32", "recipe", "fp32, or bf16: bfloat16 compute with float32 parameters and loss (JAX)",
                             choices=PRECISIONS)
    data_source: str = setting("idx", "data", "idx: the four MNIST IDX files (--data-dir, $MNIST_DIR, the user cache, "
                               "else downloaded); tfds: TensorFlow Datasets' mnist (pip install -e '.[tfds]')",
                               choices=DATA_SOURCES)
    data_dir: str | None = setting(None, "data", "folder of the MNIST IDX files (.gz or raw)")
    tfds_data_dir: str | None = setting(None, "data", "TFDS data directory holding mnist (default: TFDS's own)")
    out: str | None = setting(None, "run", "run folder for config, metrics, plots, checkpoints "
                              "(default: a new runs/<date>-<time>-<preset>)")
    overwrite: bool = setting(False, "run", "replace the run already in --out (it is deleted first)")
    resume: str | None = setting(None, "run", "continue the stopped run in RUN_DIR from its last checkpoint, with its "
                                 "recipe")
    dry_run: bool = setting(False, "run", "a smoke run: one epoch of 5 steps, 500 test images")
    compile_cache: bool = setting(True, "run", "keep compiled XLA programs in the user cache so later starts skip "
                                  "compiling (JAX)")
    torch_device: str = setting("auto", "devices", "PyTorch's device: auto (cuda if available), cpu or cuda",
                                choices=TORCH_DEVICES, flag="device")
    jax_devices: int = setting(0, "devices", "JAX: data-parallel over the first N devices (0: all)", low=0,
                               high=65_536, flag="devices")
    steps_per_call: int = setting(0, "devices", "JAX: training steps fused into one compiled call (0: one on a CPU, "
                                  f"{ACCELERATOR_STEPS_PER_CALL} on an accelerator)", low=0, high=256)
    coordinator: str | None = setting(None, "devices", "HOST:PORT of process 0, to train with several processes (JAX)")
    num_processes: int = setting(1, "devices", "with --coordinator: how many processes take part", low=1, high=65_536)
    process_id: int = setting(0, "devices", "with --coordinator: this process's rank, 0 .. num_processes - 1",
                              low=0, high=65_535)

    def validate(self) -> "Config":
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            flag = flag_of(f)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{flag} must be a finite number, got {value}")
            if meta["choices"] and value not in meta["choices"]:
                raise ConfigError(f"{flag} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
            if meta["low"] is not None and not meta["low"] <= value <= meta["high"]:
                raise ConfigError(f"{flag} must be in {meta['low']}..{meta['high']}, got {value}")
        if self.lr == 0:
            raise ConfigError("--lr must be positive, got 0")
        if self.label_smoothing >= 1:
            raise ConfigError(f"--label-smoothing must be below 1, got {self.label_smoothing}")
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.holdout_pairs > MAX_HOLDOUT_PAIRS:
            raise ConfigError(f"--holdout-pairs must be in 0..{MAX_HOLDOUT_PAIRS}, got {self.holdout_pairs}")
        if self.trunk == "deep" and (self.kernel1, self.kernel2, self.padding) != (3, 3, "same"):
            raise ConfigError("--trunk deep has 3x3 padded convolutions; --kernel1, --kernel2 and --padding are the "
                              "plain trunk's")
        if self.trunk == "deep" and self.precision != "fp32":
            raise ConfigError("--trunk deep trains in float32 only (its batch-norm statistics are kept in float32)")
        if self.process_id >= self.num_processes:
            raise ConfigError(f"--process-id must be in 0..{self.num_processes - 1}, got {self.process_id}")
        if self.coordinator is None and (self.num_processes > 1 or self.process_id):
            raise ConfigError("--num-processes and --process-id need --coordinator HOST:PORT")
        if self.coordinator is not None:
            host, _, port = self.coordinator.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65_536:
                raise ConfigError(f"--coordinator wants HOST:PORT, got {self.coordinator!r}")
        return self

    def trunk_sizes(self) -> tuple[int, int]:
        """(side of the first pool's output, side of the second's): each pool halves, rounding
        down as PyTorch's does."""
        cut1, cut2 = (0, 0) if self.padding == "same" else (self.kernel1 - 1, self.kernel2 - 1)
        first = (28 - cut1) // 2
        return first, (first - cut2) // 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MAX_HOLDOUT_PAIRS = 50  # of the 100 pairs; every digit, r and sum must stay in training
RECIPE_FIELDS = tuple(f.name for f in fields(Config) if f.metadata["group"] in RECIPE_GROUPS)

# Named recipes, measured in README.md ("Results"): each is a set of overrides of the defaults above.
PRESETS: dict[str, dict] = {
    "default": {},
    # The shortest CPU time to 99.0% test digit and sum: a quarter of the network, 2 epochs at
    # a high peak learning rate, the digit design (its sum is right as soon as its digit is), no
    # augmentation (it slows early epochs).
    "fast": {"design": "digit", "conv1": 16, "conv2": 32, "hidden": 128, "epochs": 2, "lr": 5e-3,
             "warmup_epochs": 0.2, "shift": 0},
    # The least CPU time to 99.0% test digit and sum over 10 seeds, in one epoch (docs/results.md,
    # "Speedrun"): tuomaso/train_mnist_fast's shape (5x5 then 3x3 convolutions, unpadded, so the fc
    # layer reads 5x5 features; batch 256; Adam's betas 0.7 and 0.9 for a fast start; a high peak),
    # narrower convolutions and fc layer, which cost less time than they cost accuracy, and label
    # smoothing with a lighter sum loss, which bought the accuracy back.
    "speedrun": {"design": "digit", "conv1": 16, "conv2": 24, "kernel1": 5, "padding": "valid", "hidden": 128,
                 "epochs": 1, "batch_size": 256, "lr": 1e-2, "beta1": 0.7, "beta2": 0.9, "warmup_epochs": 0.25,
                 "shift": 0, "label_smoothing": 0.1, "sum_weight": 0.5},
    # The least CPU time found to a 10-seed mean of 99.5% test digit and sum (docs/results.md,
    # "Speedrun"): the speedrun's shape and optimiser at the default network's 32/64 channels,
    # four epochs of images moved by a pixel, turned and scaled. Without the turns and scaling,
    # with 16/24 channels, more epochs, another peak or batch size, the seeds stayed near 99.45-99.5.
    "speedrun-99.5": {"design": "digit", "conv1": 32, "conv2": 64, "kernel1": 5, "padding": "valid", "epochs": 4,
                      "batch_size": 256, "lr": 1e-2, "beta1": 0.7, "beta2": 0.9, "warmup_epochs": 0.25, "shift": 1,
                      "rotate": 10.0, "scale": 0.1, "label_smoothing": 0.1, "sum_weight": 0.5},
    # The plain trunk's highest test accuracy (its training time: docs/results.md).
    "best": {"design": "digit", "epochs": 30, "label_smoothing": 0.1, "warmup_epochs": 1.0},
    # Toward the single-network record (issue 28, docs/results.md "Toward the MNIST record"):
    # best's recipe on the deep trunk, rotation and scaling, evaluated with a weight average;
    # 48 / 96 channels: a higher 3-seed mean than 32 / 64, within the time limit;
    # 10 epochs: 18 scored no higher (docs/results.md, "A deeper trunk", has the seeds' scores).
    "record": {"design": "digit", "trunk": "deep", "conv1": 48, "conv2": 96, "epochs": 10, "label_smoothing": 0.1,
               "warmup_epochs": 1.0, "rotate": 10.0, "scale": 0.1, "ema": 0.999},
    # For a GPU (scripts/benchmark.py's accelerator recipe): fewer, larger steps at a higher
    # learning rate, no translation, a whole epoch (60,000 // 512 steps) per compiled call.
    "accelerator": {"design": "digit", "batch_size": 512, "lr": 5e-3, "warmup_epochs": 0.3, "shift": 0, "epochs": 4,
                    "steps_per_call": 117},
}


def flag_of(f: dataclasses.Field) -> str:
    return "--" + (f.metadata["flag"] or f.name).replace("_", "-")


def flag(name: str) -> str:
    """The command-line flag of the Config field `name`."""
    return flag_of(next(f for f in fields(Config) if f.name == name))


def steps_per_call(cfg: Config, on_cpu: bool) -> int:
    """--steps-per-call, or where it is 0 the default for where the steps run. One on a CPU:
    fusing steps saves little there, and compiling the fused program made a cold start's first
    epoch slower than PyTorch's (benchmarks/README.md, row "one step per call on a CPU"). Several
    on an accelerator, where launching a call costs more than a small step."""
    return cfg.steps_per_call or (1 if on_cpu else ACCELERATOR_STEPS_PER_CALL)


class FlagsWhole(argparse.HelpFormatter):
    """Wraps help lines between words only: argparse would break "--warmup-epochs" at its hyphen."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints the whole usage; one line is kinder
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _flag_type(f: dataclasses.Field):
    kind = str(f.type)
    return int if "int" in kind else float if "float" in kind else str


def _help(f: dataclasses.Field, default) -> str:
    text = f.metadata["help"]
    if f.name == "preset":
        text += ". " + "; ".join(f"{name}: {preset_flags(name)}" for name in PRESETS)
    return text if default is None or default is False else f"{text} [default: {default}]"


def preset_flags(name: str) -> str:
    """What a preset sets, as the flags that would set it."""
    flags = " ".join(f"{flag(key)} {value}" for key, value in PRESETS[name].items())
    return flags or "no overrides"


def _metavar(f: dataclasses.Field) -> str:
    choices = tuple(PRESETS) if f.name == "preset" else f.metadata["choices"]
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    return {"data_dir": "DIR", "tfds_data_dir": "DIR", "out": "RUN_DIR", "resume": "RUN_DIR",
            "coordinator": "HOST:PORT"}.get(f.name, "N" if _flag_type(f) is int else "X")


def build_parser(description: str, defaults: Config) -> argparse.ArgumentParser:
    """Every Config field as a flag, grouped, each with one line of help. Flags a user does not
    give are left out of the parsed namespace (SUPPRESS), so `resolve` can tell them apart."""
    parser = OneLineParser(description=description, argument_default=argparse.SUPPRESS, formatter_class=FlagsWhole)
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    for f in fields(Config):
        flag, default = flag_of(f), getattr(defaults, f.name)
        group = groups[f.metadata["group"]]
        if f.type in (bool, "bool"):
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            group.add_argument(flag, dest=f.name, action=action, help=_help(f, default if f.default else None))
        else:
            group.add_argument(flag, dest=f.name, type=_flag_type(f), metavar=_metavar(f), help=_help(f, default))
    return parser


def preset_defaults(argv: list[str] | None) -> Config:
    """The dataclass defaults with the chosen --preset's overrides applied."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default")
    name = pre.parse_known_args(argv)[0].preset
    if name not in PRESETS:
        OneLineParser().error(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return dataclasses.replace(Config(), preset=name, **PRESETS[name])


def _parse(argv: list[str] | None, description: str) -> tuple[Config, dict]:
    defaults = preset_defaults(argv)
    given = vars(build_parser(description, defaults).parse_args(argv))
    try:
        return dataclasses.replace(defaults, **given).validate(), given
    except ConfigError as e:
        OneLineParser().error(str(e))
    raise AssertionError  # unreachable: error() exits


# The layout of a run's config.json (its "format"; docs/runs.md, "Run files from other versions").
# 4: elastic distortion. 3: the deep trunk and the weight average (ADDED_LATER). 2: PyTorch's
# device and JAX's device count named apart (RENAMED). 1: "format" itself, and every Config field.
# 0 (no "format"): the versions before, each of which wrote the fields its Config had.
CONFIG_FORMAT = 4
# Fields a config.json of format <= F holds under an older name: {old name: (F, new name)}.
RENAMED: dict[str, tuple[int, str]] = {
    "device": (1, "torch_device"),
    "devices": (1, "jax_devices"),
}
# The fields a config.json of format <= F may lack, because the versions that wrote it did not
# have them yet, each with the value those versions trained and ran with: (F, value). Any other
# field missing is an error naming it (no version left out a field it had). A field added later
# goes here with the format before its own, and CONFIG_FORMAT goes up by one.
ADDED_LATER: dict[str, tuple[int, object]] = {
    "preset": (0, "default"),  # before named recipes; the recipe's values are all in the file
    "holdout_pairs": (0, 0),  # no pairs held out
    "precision": (0, "fp32"),
    "jax_devices": (0, 1),  # JAX trained on one device
    "coordinator": (0, None),  # one process
    "num_processes": (0, 1),
    "process_id": (0, 0),
    "resume": (0, None),
    "data_source": (0, "idx"),  # the IDX files were the only source
    "tfds_data_dir": (0, None),
    "overwrite": (0, False),
    "compile_cache": (0, False),  # no persistent compilation cache yet
    # PyTorch trained on the CPU, but the device is a launch's own choice (--resume may give
    # another), and a JAX run holding "cpu" would be warned about a flag it never had.
    "torch_device": (0, "auto"),
    "rotate": (0, 0.0),  # no rotation or scaling
    "scale": (0, 0.0),
    "kernel1": (1, 3),  # the 3x3 convolutions, padded, and Adam's usual betas
    "kernel2": (1, 3),
    "padding": (1, "same"),
    "beta1": (1, 0.9),
    "beta2": (1, 0.999),
    "trunk": (2, "plain"),  # the two-convolution trunk, evaluated with the trained weights
    "ema": (2, 0.0),
    "elastic": (3, 0.0),  # no elastic distortion
}


@dataclass
class SavedRun:
    """A run's config.json, read by `read_saved_run`."""

    path: Path  # the config.json
    config: Config
    framework: str  # "jax" or "torch", as its environment says
    format: int
    unknown: list[str]  # settings this version does not know (a newer one wrote them)

    def news(self) -> str | None:
        """What in the file this version cannot read, in words; None when it reads it all."""
        parts = []
        if self.format > CONFIG_FORMAT:
            parts.append(f"was written by a newer version (config format {self.format}; this one reads {CONFIG_FORMAT})")
        if self.unknown:
            parts.append(f"holds settings this version does not know ({', '.join(self.unknown)})")
        return f"{self.path} {' and '.join(parts)}" if parts else None

    def warning(self) -> str | None:
        """The line a reader that goes on without them prints, or None."""
        news = self.news()
        if news is None:
            return None
        return f"warning: {news}; " + ("ignoring them" if self.unknown else f"reading it as format {CONFIG_FORMAT}")


def read_saved_run(run_dir: Path) -> SavedRun:
    """RUN_DIR/config.json as a Config, by the rules of its format (ADDED_LATER); every problem is
    a one-line ConfigError naming the file."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (is {run_dir} a training run's folder?)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # UnicodeDecodeError is one
        raise ConfigError(f"{path}: not a run's config.json (not JSON: {e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a run's config.json (not a JSON object)")
    for key in ("config", "environment"):
        if not isinstance(saved.get(key), dict):
            raise ConfigError(f"{path}: not a run's config.json (no {key!r} object in it)")
    framework, version = saved["environment"].get("framework"), saved.get("format", 0)
    if not isinstance(framework, str):
        raise ConfigError(f"{path}: not a run's config.json (no 'framework' in its environment)")
    if type(version) is not int or version < 0:
        raise ConfigError(f"{path}: \"format\" must be a whole number, got {version!r}")
    values, unknown = settings_of_format(saved["config"], version, path)
    try:
        config = Config(**values).validate()
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{path}: invalid config ({e})") from None
    return SavedRun(path, config, framework, version, unknown)


def settings_of_format(values: dict, version: int, path: Path) -> tuple[dict, list[str]]:
    """(the Config fields of a saved config, missing ones filled by ADDED_LATER, and the names
    this version does not know)."""
    known = [f.name for f in fields(Config)]
    values = {(RENAMED[name][1] if name in RENAMED and version <= RENAMED[name][0] else name): value
              for name, value in values.items()}
    filled = {name: ADDED_LATER[name][1] for name in known
              if name not in values and name in ADDED_LATER and version <= ADDED_LATER[name][0]}
    missing = [name for name in known if name not in values and name not in filled]
    if missing and version > CONFIG_FORMAT:
        raise ConfigError(f"{path}: no {', '.join(missing)} in it (written by a newer version, config format "
                          f"{version}, that does without: read it with that version)")
    if missing:
        raise ConfigError(f"{path}: no {', '.join(missing)} in it (a config.json of format {version} holds "
                          f"{'them' if len(missing) > 1 else 'it'}; a damaged or edited file?)")
    unknown = sorted(set(values) - set(known))
    return {**filled, **{name: values[name] for name in known if name in values}}, unknown


def saved_config(run_dir: Path) -> Config:
    """The settings a run was started with (its config.json). One written by a newer version, or
    holding settings this version does not know, is refused: resuming would train without them
    and rewrite config.json without them."""
    try:
        saved = read_saved_run(run_dir)
    except ConfigError as e:
        raise ConfigError(f"--resume {run_dir}: {e}") from None
    if saved.format > CONFIG_FORMAT or saved.unknown:
        raise ConfigError(f"--resume {run_dir}: {saved.news()}; resume it with the version that wrote it "
                          "(this one would train without what it does not know, and drop it from config.json)")
    return saved.config


def resolve(argv: list[str] | None, description: str) -> Config:
    """The final Config of a launch. A fresh run: flags over the preset over the defaults. On
    --resume: the saved run's recipe, with this launch's data, run and device flags; a flag that
    would change the recipe is refused (a resumed run must be the run that was started)."""
    cfg, given = _parse(argv, description)
    if cfg.resume is None:
        return cfg
    run_dir = Path(cfg.resume)
    if cfg.overwrite:
        raise ConfigError(f"--overwrite starts a new run in place of an old one; it cannot go with --resume {run_dir}")
    saved = saved_config(run_dir)
    changed = [name for name in RECIPE_FIELDS if name in given and given[name] != getattr(saved, name)]
    if changed:
        flags = ", ".join(f"{flag(n)} {given[n]} (the run has {getattr(saved, n)})" for n in changed)
        raise ConfigError(f"--resume {run_dir} continues the run's own recipe; cannot change {flags}. "
                       "Start a new run with --out instead")
    if "out" in given and Path(given["out"]).resolve() != run_dir.resolve():
        raise ConfigError(f"--resume {run_dir} writes into {run_dir}; --out {given['out']} cannot point elsewhere")
    launch = {name: value for name, value in given.items() if name not in RECIPE_FIELDS}
    return dataclasses.replace(saved, **{**launch, "resume": str(run_dir), "out": str(run_dir), "overwrite": False})
