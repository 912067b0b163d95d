"""Run by test_backends.py inside another interpreter environment: detections for the given images, as JSON."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batch_detect.model.detector import Detector  # noqa: E402
from batch_detect.model.interpreter import load_backend, read_model  # noqa: E402


def main() -> None:
    backend_name, model, *images = sys.argv[1:]
    backend = load_backend(backend_name)
    det = Detector(backend, read_model(model), num_threads=1, score_threshold=0.3, resize="letterbox",
                   normalization="auto", max_pixels=10**8)
    out = {"backend": backend.name, "version": backend.version, "numpy": __import__("numpy").__version__,
           "images": {}}
    for path in images:
        with open(path, "rb") as fh:
            r = det.process(path, fh.read())
        d = r.detections
        out["images"][os.path.basename(path)] = [
            [int(c), float(s), *map(float, b)] for c, s, b in zip(d.class_ids, d.scores, d.boxes)
        ]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
