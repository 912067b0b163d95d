"""Entrypoint for `ray job submit`: the same arguments as `batch-detect run`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/detect.py --model models/shapes_ssd_uint8.tflite --input IMAGES --output OUT

Inside a job Ray sets RAY_ADDRESS, so the run joins the cluster instead of starting its own. The job runs in
Ray's temporary copy of --working-dir: relative --model/--labels/--config are read from it, and a relative
--input or --output is refused (batch_detect/commands/rayjob.py).
"""

import os
import sys

# With --working-dir the project is the job's cwd; make the package importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batch_detect.commands.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
