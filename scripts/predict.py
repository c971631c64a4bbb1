"""Predict the digit in images and the digit + a number, with a trained run (JAX or PyTorch).

  python scripts/predict.py --run RUN_DIR --image digit.png --number 3
  python scripts/predict.py --run RUN_DIR --image a.png b.jpg my_digits/ --number 3 [--json [--probs]]
  python scripts/predict.py --run RUN_DIR --mnist-test-index 17 18 19 [--number 3 1 4] [--json]

Each image (PNG/JPEG, any size, dark on light or light on dark) is prepared as MNIST's were:
gray, cropped to the ink, scaled to 20 px, centred by mass in 28x28. All images are answered
in one batch; --json prints one JSON object per image, one per line.

An image that cannot be read or holds no digit does not stop the others: it gets an error record
({"image": PATH, "error": REASON} with --json, a line on stderr otherwise), and the last line on
stderr counts such images and names the first ten. Exit codes: 0 every image answered; 1 some
answered, some could not be read; 2 nothing answered (bad flags or run, or no image could be
read). --strict stops at the first image that cannot be read instead (exit code 2, before the
model loads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from common import data as D  # noqa: E402
from common import tfds_mnist  # noqa: E402
from common.cli import run_main  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.config import TORCH_DEVICES, OneLineParser  # noqa: E402
from common.images import ImageError, images_in, load_image  # noqa: E402
from common.predictor import Run, load_predictor, read_run  # noqa: E402

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
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < D.COUNTS["test"]:
        raise argparse.ArgumentTypeError(f"must be from 0 to {D.COUNTS['test'] - 1} (the MNIST test set), got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1])
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a training run's output folder (--out of train_*.py)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", metavar="PATH", help="PNG or JPEG files of one handwritten digit each, "
                        "or folders of them")
    source.add_argument("--mnist-test-index", nargs="+", type=_index, metavar="I",
                        help="images I of the MNIST test set (0..9999)")
    parser.add_argument("--number", nargs="+", type=_number, metavar="N",
                        help="the number r in 0..9 to add: one for every image, or one per image "
                             "(default with --mnist-test-index: the test set's own r)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    parser.add_argument("--probs", action="store_true", help="with --json: add the whole probability vectors "
                        "(digit_probs: 10 values for digits 0..9, sum_probs: 19 for sums 0..18)")
    parser.add_argument("--strict", action="store_true", help="stop at the first image that cannot be read "
                        "(exit code 2) instead of answering the others")
    parser.add_argument("--device", choices=TORCH_DEVICES,
                        help="PyTorch runs: auto (cuda if available; the default), cpu or cuda. A JAX run predicts "
                             "on JAX's default backend (JAX_PLATFORMS=cpu chooses the CPU) and warns if this is given")
    parser.add_argument("--data-dir", metavar="DIR", help="MNIST folder for --mnist-test-index (default: the run's, $MNIST_DIR, or the cache)")
    args = parser.parse_args(argv)
    if args.image is not None and args.number is None:
        parser.error("--number N is required with --image")
    if args.probs and not args.json:
        parser.error("--probs adds to the JSON records: give --json too")
    return args


@dataclass
class Example:
    source: str  # what the text output calls it
    image: np.ndarray  # uint8 (28, 28)
    number: int
    facts: dict  # for the JSON output: {"image": path} or {"index", "true_digit", "true_sum"}


@dataclass
class Failure:
    """An image that could not be read or holds no digit."""

    error: ImageError

    def record(self) -> dict:  # its --json line
        return {"image": self.error.path, "error": self.error.reason}


def image_examples(paths: list[str], numbers: list[int], strict: bool) -> list[Example | Failure]:
    """Each file's Example, or (unless `strict`, where the first one raises) its Failure, in order."""
    files = [f for p in paths for f in (images_in(p) if Path(p).is_dir() else [Path(p)])]
    numbers = per_image(numbers, len(files))
    items: list[Example | Failure] = []
    for f, n in zip(files, numbers):
        try:
            items.append(Example(str(f), load_image(f), n, {"image": str(f)}))
        except ImageError as e:
            if strict:
                raise
            items.append(Failure(e))
    return items


def mnist_test_examples(indices: list[int], numbers: list[int] | None, data_dir: str | None, run: Run) -> list[Example]:
    if data_dir is None and run.config.data_source == "tfds":  # where the run read MNIST from
        arrays = tfds_mnist.load_mnist(run.config.tfds_data_dir)
        images, labels = arrays["test_images"], arrays["test_labels"]
    else:
        if data_dir is None:  # the folder the run trained from, if it is still there
            saved = run.config.data_dir
            data_dir = saved if saved and Path(saved).expanduser().is_dir() else None
        directory = D.locate(data_dir)
        images = D.load_file(directory, D.FILES["test_images"], 3, D.COUNTS["test"])
        labels = D.load_file(directory, D.FILES["test_labels"], 1, D.COUNTS["test"])
    test_numbers = D.test_numbers()  # as D.make_splits pairs them
    numbers = [int(test_numbers[i]) for i in indices] if numbers is None else per_image(numbers, len(indices))
    return [Example(f"MNIST test image {i} (true digit {labels[i]})", images[i], n,
                    {"index": i, "true_digit": int(labels[i]), "true_sum": int(labels[i]) + n})
            for i, n in zip(indices, numbers)]


def per_image(numbers: list[int], count: int) -> list[int]:
    if len(numbers) not in (1, count):
        raise UserError(f"--number: give one number for all images or one per image ({count} images, "
                        f"{len(numbers)} numbers)")
    return numbers * count if len(numbers) == 1 else numbers


@contextlib.contextmanager
def quiet():
    """Silences what the libraries print while the model loads and runs (XLA's and tensorstore's
    C++ logs on file descriptors 1 and 2, Python logging), so that the output is this script's
    alone. Orbax's failure logging is muted where checkpoints are read, for training too
    (jax_impl/checkpoint.py:orbax_quiet). MNIST_SUM_DEBUG=1 lets it all through."""
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
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        logging.disable(previous_disable)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    run = read_run(args.run)  # these answer at once, before any framework loads
    if run.warning:
        print(run.warning, file=sys.stderr)
    warn_if_device_unused(args.device, run)
    run.config = replace(run.config, torch_device=args.device or "auto")  # where to predict is this call's choice
    if args.image is not None:
        items = image_examples(args.image, args.number, args.strict)
    else:
        items = mnist_test_examples(args.mnist_test_index, args.number, args.data_dir, run)
    examples = [item for item in items if isinstance(item, Example)]
    failures = [item for item in items if isinstance(item, Failure)]
    results, step = answer(run, examples, args.probs) if examples else ([], None)
    answers = iter(results)
    if args.json:
        records = [item.record() if isinstance(item, Failure) else next(answers) for item in items]
        print("\n".join(json.dumps(r) for r in records))
    elif examples:
        print(f"run     {run.dir} ({run.framework}, step {step})")
        print("\n\n".join("\n".join(answer_lines(e, r)) for e, r in zip(examples, results)))
    report_failures(failures, len(items), answered=len(examples), as_json=args.json)
    return results


def warn_if_device_unused(device: str | None, run: Run) -> None:
    if device is not None and run.framework != "torch":
        print(f"warning: --device {device} is for PyTorch runs; {run.dir} is a {run.framework} run, which predicts on "
              "JAX's default backend (JAX_PLATFORMS=cpu chooses the CPU)", file=sys.stderr)


def answer(run: Run, examples: list[Example], probs: bool) -> tuple[list[dict], int]:
    """One result per example, from one batch through the run's model, and the checkpoint's step."""
    with quiet():
        predictor = load_predictor(run)
        digit_probs, sum_probs = predictor(np.stack([e.image for e in examples]), np.array([e.number for e in examples]))
    results = []
    for example, digit_p, sum_p in zip(examples, digit_probs, sum_probs):
        digit, summ = int(digit_p.argmax()), int(sum_p.argmax())
        result = {"digit": digit, "digit_prob": float(digit_p[digit]), "sum": summ, "sum_prob": float(sum_p[summ]),
                  "number": example.number, "framework": predictor.framework, **example.facts}
        if probs:
            result.update(digit_probs=[float(p) for p in digit_p], sum_probs=[float(p) for p in sum_p])
        results.append(result)
    return results, predictor.step


NAMED = 10  # images the last line names; every one has its own line (or JSON record) before it


def report_failures(failures: list[Failure], total: int, answered: int, as_json: bool) -> None:
    """The images that could not be read, on stderr, and the exit code they make: 1 when others
    were answered, 2 when none was (as --strict, and as a single image's problem always was)."""
    if not failures:
        return
    if total == 1:
        raise failures[0].error
    names = [f.error.path for f in failures]
    more = f" and {len(names) - NAMED} more" if len(names) > NAMED else ""
    lines = [] if as_json else [f"error: {f.error}" for f in failures]
    lines.append(f"error: {len(failures)} of {total} images could not be read: {', '.join(names[:NAMED])}{more}")
    print("\n".join(lines), file=sys.stderr)
    sys.exit(1 if answered else 2)


def answer_lines(example: Example, result: dict) -> list[str]:
    lines = [f"input   {example.source}", f"number  {example.number}"]
    for what in ("digit", "sum"):
        line = f"{what:<6}  {result[what]:<3} p={result[what + '_prob']:.3f}"
        if f"true_{what}" in result:
            true = result[f"true_{what}"]
            line += "  right" if result[what] == true else f"  wrong (true {true})"
        lines.append(line)
    if result["sum"] != result["digit"] + example.number:
        lines.append(f"note    the sum head's {result['sum']} differs from the digit head's {result['digit']} + "
                     f"{example.number} = {result['digit'] + example.number}")
    return lines


if __name__ == "__main__":
    run_main(main)
