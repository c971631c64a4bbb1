"""Predict the digit in an image and the digit + a number, with a trained run (JAX or PyTorch).

  python scripts/predict.py --run RUN_DIR --image digit.png --number 3
  python scripts/predict.py --run RUN_DIR --mnist-test-index 17 [--number 3] [--json]

The image (PNG/JPEG, any size, dark on light or light on dark) is prepared as MNIST's
were: gray, cropped to the ink, scaled to 20 px, centred by mass in 28x28.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from common.cli import UserError, run_main  # noqa: E402
from common.config import OneLineParser  # noqa: E402

FRAMEWORKS = ("jax", "torch")
DEBUG_ENV = "MNIST_SUM_DEBUG"  # set to 1 to see what the frameworks print while a checkpoint loads


def _number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 9, got {text!r}") from None
    if not 0 <= value <= 9:
        raise argparse.ArgumentTypeError(f"must be from 0 to 9, got {value}")
    return value


def _index(text: str) -> int:
    from common.data import COUNTS  # numpy only

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < COUNTS["test"]:
        raise argparse.ArgumentTypeError(f"must be from 0 to {COUNTS['test'] - 1} (the MNIST test set), got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a training run's output folder (--out of train_*.py)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", metavar="PATH", help="a PNG or JPEG of one handwritten digit")
    source.add_argument("--mnist-test-index", type=_index, metavar="I", help="image I of the MNIST test set (0..9999)")
    parser.add_argument("--number", type=_number, metavar="N",
                        help="the number r in 0..9 to add (default with --mnist-test-index: the test set's own r)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--data-dir", metavar="DIR", help="MNIST folder for --mnist-test-index (default: the run's, $MNIST_DIR, or the cache)")
    args = parser.parse_args(argv)
    if args.image is not None and args.number is None:
        parser.error("--number N is required with --image")
    return args


# --- the run -----------------------------------------------------------------


@dataclass
class Run:
    dir: Path
    config: dict  # the Config fields saved in config.json
    framework: str


def read_run(run_dir: str | Path) -> Run:
    """RUN_DIR/config.json, checked; and that the run left a checkpoint. No framework import."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"--run {run_dir}: no such directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing (is {run_dir} a training run's --out folder?)")
    try:
        saved = json.loads(config_path.read_text())
        config, framework = saved["config"], saved["environment"]["framework"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{config_path}: not a run's config.json ({type(e).__name__}: {e})") from None
    if framework not in FRAMEWORKS:
        raise UserError(f"{config_path}: unknown framework {framework!r} (expected {' or '.join(FRAMEWORKS)})")
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: 'config' is not an object")
    if framework == "jax":
        steps = path / "checkpoints"
        if not steps.is_dir() or not any(p.is_dir() and p.name.isdigit() for p in steps.iterdir()):
            raise UserError(f"{run_dir}: no checkpoint (expected {steps}/<epoch>/; did training finish an epoch?)")
    elif not (path / "checkpoint.pt").is_file():
        raise UserError(f"{run_dir}: no checkpoint (expected {path / 'checkpoint.pt'}; did training finish an epoch?)")
    return Run(path, config, framework)


def make_config(run: Run):
    from common.config import Config, ConfigError

    try:
        return Config(**run.config).validate()
    except (TypeError, ConfigError) as e:
        raise UserError(f"{run.dir / 'config.json'}: invalid config ({e})") from None


@contextlib.contextmanager
def quiet(exit_on_error: bool = False):
    """Silences what Orbax, absl, XLA and tensorstore print (Python logging and the C++ side,
    on file descriptors 1 and 2) while a checkpoint loads, so a bad checkpoint reads as the
    one line this script prints. MNIST_SUM_DEBUG=1 lets it all through.

    With `exit_on_error` (the command line), a UserError is printed to the real stderr and the
    process ends at once: when Orbax fails on damaged files, its reader threads keep printing
    "Event loop is closed" tracebacks for a while after the exception reaches us."""
    if os.environ.get(DEBUG_ENV):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    previous_disable = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            except UserError as e:
                if exit_on_error:  # as common.cli.run_main would print it, but with the noise still muted
                    os.write(saved[1], f"error: {e}\n".encode())
                    os._exit(2)
                raise
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        logging.disable(previous_disable)


def _mismatch(run: Run, expected: dict, found: dict) -> None:
    """Raises a one-line UserError naming the first difference of parameter names or shapes."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    where = f"the checkpoint does not match the model {run.dir / 'config.json'} describes"
    if missing or extra:
        detail = f"parameters missing: {', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(extra[:3]) or 'none'}"
        raise UserError(f"{where} ({detail})")
    for name in expected:
        if tuple(expected[name]) != tuple(found[name]):
            raise UserError(f"{where} ({name} is {tuple(found[name])} in the checkpoint, "
                            f"{tuple(expected[name])} in the model; conv1/conv2/hidden/design differ?)")


@dataclass
class Predictor:
    """predict(images uint8 (n, 28, 28), numbers int (n,)) -> (digit probs (n, 10), sum probs (n, 19))."""

    framework: str
    step: int  # training steps behind the checkpoint
    predict: Callable

    def __call__(self, images, numbers):
        return self.predict(images, numbers)


def softmax(logits):
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def load_predictor(run_dir: str | Path, exit_on_error: bool = False) -> Predictor:
    """The run's model, restored; every problem is a one-line UserError (see `quiet` for exit_on_error)."""
    run = read_run(run_dir)
    cfg = make_config(run)
    with quiet(exit_on_error):
        return (load_jax if run.framework == "jax" else load_torch)(run, cfg)


def _path_name(path) -> str:
    parts = []
    for key in path:
        part = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if part != "value":  # nnx.Param's leaf; Orbax's metadata spells it the same way
            parts.append(str(part))
    return ".".join(parts)


def load_jax(run: Run, cfg) -> Predictor:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from jax_impl import checkpoint
    from jax_impl.train import init_model, make_optimizer, make_predict

    # Shapes only: initialising the weights for real costs seconds of op-by-op compilation.
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
    like = {"params": params, "opt_state": jax.eval_shape(make_optimizer(cfg, 1).init, params)}
    directory = (run.dir / "checkpoints").absolute()
    try:
        mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                     item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                    "meta": ocp.JsonCheckpointHandler()})
        epoch = mngr.latest_step()
    except Exception as e:  # noqa: BLE001 - Orbax raises many kinds on a damaged folder
        raise UserError(f"{directory}: cannot read the checkpoints ({type(e).__name__}: {_first_line(e)})") from None
    if epoch is None:
        raise UserError(f"{directory}: no finished checkpoint (an interrupted save leaves none)")
    where = directory / str(epoch)
    try:
        stored = mngr.item_metadata(epoch)["state"]
        stored = stored.tree if hasattr(stored, "tree") else stored
        found = {_path_name(p): m.shape for p, m in jax.tree_util.tree_leaves_with_path(stored["params"])}
    except Exception as e:  # noqa: BLE001 - truncated or garbage files fail in json, tensorstore, zarr...
        raise UserError(f"{where}: corrupted checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    expected = {_path_name(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(params)}
    _mismatch(run, expected, found)
    try:
        state, _ = checkpoint.restore(mngr, like, epoch)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{where}: corrupted checkpoint, or not this run's model ({type(e).__name__}: {_first_line(e)})") from None
    restored = state["params"]
    if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored)):
        raise UserError(f"{where}: the checkpoint holds non-finite parameters")
    logits = make_predict(graphdef)

    def predict(images, numbers):
        digit, summ = logits(restored, np.asarray(images, np.uint8), np.asarray(numbers, np.int32))
        return softmax(digit), softmax(summ)

    predict(np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int32))  # compile inside quiet()
    return Predictor("jax", int(epoch), predict)  # Orbax's step is the global training step


def load_torch(run: Run, cfg) -> Predictor:
    import numpy as np
    import torch

    from torch_ref.model import SumNet
    from torch_ref.train import preprocess

    path = run.dir / "checkpoint.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        weights = saved["model"]
        epoch = int(saved.get("step", 0))
        found = {name: tuple(t.shape) for name, t in weights.items()}
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF and type errors alike
        # torch's own advice on an unpickling error (load with weights_only=False) would run untrusted code
        detail = "not a PyTorch checkpoint" if isinstance(e, pickle.UnpicklingError) else _first_line(e)
        raise UserError(f"{path}: corrupted checkpoint ({type(e).__name__}: {detail})") from None
    model = SumNet(cfg)
    _mismatch(run, {name: tuple(t.shape) for name, t in model.state_dict().items()}, found)
    try:
        model.load_state_dict(weights)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: the checkpoint does not match the run's model ({type(e).__name__}: {_first_line(e)})") from None
    if not all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()):
        raise UserError(f"{path}: the checkpoint holds non-finite parameters")
    model.eval()

    @torch.no_grad()
    def predict(images, numbers):
        images = torch.from_numpy(np.array(images, np.uint8))  # a copy: torch wants writable memory
        digit, summ = model(preprocess(images), torch.from_numpy(np.asarray(numbers, np.int64)))
        return softmax(digit.numpy()), softmax(summ.numpy())

    return Predictor("torch", epoch, predict)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0][:157] + "...") if lines and len(lines[0]) > 160 else (lines[0] if lines else "no details")


# --- the input -----------------------------------------------------------------


def mnist_test_example(index: int, data_dir: str | None, run: Run) -> tuple:
    """(image uint8 (28, 28), label, the test set's number) of MNIST test image `index`."""
    from common import data as D

    if data_dir is None:  # the folder the run trained from, if it is still there
        saved = run.config.get("data_dir")
        data_dir = saved if saved and Path(saved).expanduser().is_dir() else None
    directory = D.locate(data_dir)
    images = D.load_file(directory, D.FILES["test_images"], 3, D.COUNTS["test"])
    labels = D.load_file(directory, D.FILES["test_labels"], 1, D.COUNTS["test"])
    numbers = D.numbers_for(D.COUNTS["test"], D.TEST_NUMBERS_SEED)  # as D.make_splits pairs them
    return images[index], int(labels[index]), int(numbers[index])


def main(argv: list[str] | None = None, cli: bool = False) -> dict:
    args = parse_args(argv)
    run = read_run(args.run)  # answers at once, before any framework loads
    truth = None
    if args.image is not None:
        from common.images import load_image

        image, number = load_image(args.image), args.number
        source = args.image
    else:
        image, label, test_number = mnist_test_example(args.mnist_test_index, args.data_dir, run)
        number = test_number if args.number is None else args.number
        truth = {"index": args.mnist_test_index, "true_digit": label, "true_sum": label + number}
        source = f"MNIST test image {args.mnist_test_index}"
    predictor = load_predictor(run.dir, exit_on_error=cli)
    digit_probs, sum_probs = predictor(image[None], [number])
    digit, summ = int(digit_probs[0].argmax()), int(sum_probs[0].argmax())
    result = {"digit": digit, "digit_prob": float(digit_probs[0, digit]), "sum": summ, "sum_prob": float(sum_probs[0, summ]),
              "number": number, "framework": predictor.framework, **(truth or {})}
    if args.json:
        print(json.dumps(result))
        return result
    print(f"run     {run.dir} ({predictor.framework}, step {predictor.step})")
    print(f"input   {source}" + (f" (true digit {truth['true_digit']})" if truth else ""))
    print(f"number  {number}")
    for what, key in (("digit", "digit"), ("sum", "sum")):
        line = f"{what:<6}  {result[key]:<3} p={result[key + '_prob']:.3f}"
        if truth:
            true = truth[f"true_{key}"]
            line += "  right" if result[key] == true else f"  wrong (true {true})"
        print(line)
    if summ != digit + number:
        print(f"note    the sum head's {summ} differs from the digit head's {digit} + {number} = {digit + number}")
    return result


if __name__ == "__main__":
    run_main(lambda: main(cli=True))
