"""The naive loop of the article this project grew from: one process, one interpreter using every core,
read + decode + invoke one image after another."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batch_detect.model.detector import Detector  # noqa: E402
from batch_detect.model.interpreter import load_backend, read_model  # noqa: E402


def main() -> None:
    model, listing = sys.argv[1], sys.argv[2]
    det = Detector(load_backend(), read_model(model), num_threads=os.cpu_count() or 1, score_threshold=0.5,
                   resize="stretch", normalization="auto", max_pixels=10**9)
    n = 0
    for path in open(listing).read().split():
        with open(path, "rb") as fh:
            det.process(path, fh.read())
        n += 1
    print(f"naive loop: {n} images")


if __name__ == "__main__":
    main()
