"""Predict the digit in images and the digit + a number, with a trained run (JAX or PyTorch).

  python scripts/predict.py --run RUN_DIR --image digit.png --number 3
  python scripts/predict.py --run RUN_DIR --image a.png b.jpg my_digits/ --number 3 [--json]
  python scripts/predict.py --run RUN_DIR --mnist-test-index 17 18 19 [--number 3 1 4] [--json]

Each image (PNG/JPEG, any size, dark on light or light on dark) is prepared as MNIST's were:
gray, cropped to the ink, scaled to 20 px, centred by mass in 28x28. All images are answered
in one batch; --json prints one JSON object per image, one per line.
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
from common.cli import UserError, run_main  # noqa: E402
from common.config import TORCH_DEVICES, OneLineParser  # noqa: E402
from common.images import images_in, load_image  # noqa: E402
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
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--device", choices=TORCH_DEVICES, default="auto",
                        help="PyTorch runs: auto (cuda if available), cpu or cuda; JAX uses its default backend")
    parser.add_argument("--data-dir", metavar="DIR", help="MNIST folder for --mnist-test-index (default: the run's, $MNIST_DIR, or the cache)")
    args = parser.parse_args(argv)
    if args.image is not None and args.number is None:
        parser.error("--number N is required with --image")
    return args


@dataclass
class Example:
    source: str  # what the text output calls it
    image: np.ndarray  # uint8 (28, 28)
    number: int
    facts: dict  # for the JSON output: {"image": path} or {"index", "true_digit", "true_sum"}


def image_examples(paths: list[str], numbers: list[int]) -> list[Example]:
    files = [f for p in paths for f in (images_in(p) if Path(p).is_dir() else [Path(p)])]
    numbers = per_image(numbers, len(files))
    return [Example(str(f), load_image(f), n, {"image": str(f)}) for f, n in zip(files, numbers)]


def mnist_test_examples(indices: list[int], numbers: list[int] | None, data_dir: str | None, run: Run) -> list[Example]:
    if data_dir is None and run.config.data_source == "tfds":  # where the run read MNIST from
        arrays = D.load_arrays("tfds", None, run.config.tfds_data_dir)
        images, labels = arrays["test_images"], arrays["test_labels"]
    else:
        if data_dir is None:  # the folder the run trained from, if it is still there
            saved = run.config.data_dir
            data_dir = saved if saved and Path(saved).expanduser().is_dir() else None
        directory = D.locate(data_dir)
        images = D.load_file(directory, D.FILES["test_images"], 3, D.COUNTS["test"])
        labels = D.load_file(directory, D.FILES["test_labels"], 1, D.COUNTS["test"])
    test_numbers = D.numbers_for(D.COUNTS["test"], D.TEST_NUMBERS_SEED)  # as D.make_splits pairs them
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
    """Silences what Orbax, absl, XLA and tensorstore print (Python logging and the C++ side, on
    file descriptors 1 and 2) while the model loads and runs, so that the output is this script's
    alone. MNIST_SUM_DEBUG=1 lets it all through."""
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
    run.config = replace(run.config, device=args.device)  # where to predict is this call's choice
    if args.image is not None:
        examples = image_examples(args.image, args.number)
    else:
        examples = mnist_test_examples(args.mnist_test_index, args.number, args.data_dir, run)
    with quiet():
        predictor = load_predictor(run)
        digit_probs, sum_probs = predictor(np.stack([e.image for e in examples]), np.array([e.number for e in examples]))
    results = []
    for example, digit_p, sum_p in zip(examples, digit_probs, sum_probs):
        digit, summ = int(digit_p.argmax()), int(sum_p.argmax())
        results.append({"digit": digit, "digit_prob": float(digit_p[digit]), "sum": summ, "sum_prob": float(sum_p[summ]),
                        "number": example.number, "framework": predictor.framework, **example.facts})
    if args.json:
        print("\n".join(json.dumps(r) for r in results))
    else:
        print(f"run     {run.dir} ({predictor.framework}, step {predictor.step})")
        print("\n\n".join("\n".join(answer_lines(e, r)) for e, r in zip(examples, results)))
    return results


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
