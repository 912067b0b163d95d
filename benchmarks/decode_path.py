"""Decode + resize of one JPEG to the model input (issue #34), one thread: Pillow's draft + bilinear (the
path where simplejpeg or OpenCV is missing, and every image's before #34) against fastjpeg (simplejpeg at the
same draft scale + OpenCV's area average), both in one process, in alternating rounds (the order flipped
each round) so that the load of a shared machine hits both alike; each arm's median round is reported.

Accuracy: the mean absolute pixel difference (0..255 scale) of each arm's 300x300 stretched input from two
antialiased references, the full-size decode resized without a reducing gap by Pillow's Lanczos filter and by
its box filter (the exact area average). Bilinear (a triangle) sits nearer Lanczos, OpenCV's area average
nearer the box: each reference favours one arm a little, so both are shown.

With `--job N --before DIR` (an earlier checkout), instead: this job on N benchmark JPEGs (SSD, as rates.py runs it),
this checkout and DIR's alternately, `--rounds` each; processing rate = images / the manifest's run_s, steady =
images / first shard start to last shard end (rates.steady_rate).

    python benchmarks/decode_path.py [--rounds 7] [--job 2400 --before DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from batch_detect.model import fastjpeg  # noqa: E402
from batch_detect.model.interpreter import TensorSpec  # noqa: E402
from batch_detect.model.preprocess import InputSpec, build_input, decode_image, pixel_mapping  # noqa: E402

DATA = os.path.join(ROOT, "benchmarks", "data")
ARMS = ("pillow", "fastjpeg")
CASES = [(300, 300, "stretch"), (640, 640, "letterbox")]  # the benchmark SSD's input; a YOLO-style one


def image_sets() -> dict[str, list[bytes]]:
    from bench import make_images
    from batch_detect.synthetic import draw_scene, scene_rng

    bench = [open(p, "rb").read() for p in make_images(os.path.join(DATA, "images"), 100)]
    by_size: dict[str, list[bytes]] = {"<= 1 MP (640x480 to 1280x720)": [], "~2 MP (1920x1080)": []}
    for data in bench:
        w, h = Image.open(io.BytesIO(data)).size
        by_size["~2 MP (1920x1080)" if w * h > 1_500_000 else "<= 1 MP (640x480 to 1280x720)"].append(data)
    photos, turned = [], []
    for i in range(6):
        buf = io.BytesIO()
        img = draw_scene(scene_rng(12, i), 4000, 3000)[0]
        img.save(buf, "JPEG", quality=90)
        photos.append(buf.getvalue())
        exif, buf = Image.Exif(), io.BytesIO()
        exif[0x0112] = 6  # stored on its side, as phones do
        img.transpose(Image.ROTATE_90).save(buf, "JPEG", quality=90, exif=exif)
        turned.append(buf.getvalue())
    return {**by_size, "12 MP (4000x3000)": photos, "12 MP, EXIF-turned": turned}


def prepare_all(datas: list[bytes], arm: str, width: int, height: int, mode: str) -> tuple[float, list]:
    """ms per image for decode_image + build_input (what Detector.prepare does), and the inputs."""
    fastjpeg.ENABLED = arm == "fastjpeg"
    spec = InputSpec.from_tensor(TensorSpec(0, "in", (1, height, width, 3), (1, height, width, 3), "uint8", 0.0, 0))
    mapping = pixel_mapping(spec, "auto")
    t0 = time.perf_counter()
    out = [build_input(decode_image(d, 10**9, (width, height, mode)), spec, mapping, mode)[0] for d in datas]
    return (time.perf_counter() - t0) * 1000 / len(datas), out


def references(datas: list[bytes], size: tuple[int, int]) -> dict[str, list[np.ndarray]]:
    refs: dict[str, list[np.ndarray]] = {"lanczos": [], "box": []}
    for data in datas:
        full = decode_image(data, 10**9).image  # no draft: the whole image, turned upright
        for name, kernel in (("lanczos", Image.LANCZOS), ("box", Image.BOX)):
            refs[name].append(np.asarray(full.resize(size, kernel, reducing_gap=None), np.float32))
    return refs


def pixel_error(tensors: list[np.ndarray], refs: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(t[0].astype(np.float32) - r).mean() for t, r in zip(tensors, refs)]))


def job_rates(count: int, before: str, rounds: int) -> tuple[dict, list[str]]:
    import json
    import subprocess

    from rates import MODEL, job_inputs, steady_rate

    _, work, listing, env = job_inputs(count, "decode_path_job_")
    runs: dict[str, list[dict]] = {"before": [], "now": []}
    for r in range(rounds):
        for arm in (("before", "now") if r % 2 == 0 else ("now", "before")):
            tree = before if arm == "before" else ROOT
            out = os.path.join(work, arm)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "batch_detect", "run", "--model", MODEL, "--input", listing,
                            "--output", out, "--shard-size", "64", "--score-threshold", "0.5", "--overwrite"],
                           env={**env, "PYTHONPATH": tree}, cwd=tree, check=True, capture_output=True)
            wall = time.perf_counter() - t0
            m = json.load(open(os.path.join(out, "_manifest.json")))
            runs[arm].append({"wall_s": wall, "processing": m["counts"]["images"] / m["timings"]["run_s"],
                              "steady": steady_rate(out), "executor": m["cluster"]["executor"]})
            print(arm, runs[arm][-1], flush=True)
    lines = ["", f"This job on {count} benchmark JPEGs (SSD 300 uint8, shards of 64), before = {before}, the arms "
             f"alternating, {rounds} rounds each; medians; images/s.", "",
             "| arm | executor | wall s | processing | steady |", "|---|---|---|---|---|"]
    med = {a: {k: statistics.median(x[k] for x in v) for k in ("wall_s", "processing", "steady")}
           for a, v in runs.items()}
    for arm in ("before", "now"):
        lines.append(f"| {arm} | {runs[arm][0]['executor']} | {med[arm]['wall_s']:.1f} | "
                     f"{med[arm]['processing']:.1f} | {med[arm]['steady']:.1f} |")
    lines.append(f"| now / before | | {med['now']['wall_s'] / med['before']['wall_s']:.2f} | "
                 f"{med['now']['processing'] / med['before']['processing']:.2f} | "
                 f"{med['now']['steady'] / med['before']['steady']:.2f} |")
    return {"count": count, "before": before, "runs": runs, "median": med}, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--job", type=int, default=0, help="also run this job on N JPEGs, against --before")
    parser.add_argument("--before", help="an earlier checkout of this repository, for --job")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    from bench import cpu_model, save

    if not fastjpeg.ENABLED:
        print("simplejpeg or opencv-python-headless is not installed: nothing to compare")
        return 2
    if args.job:
        if not args.before:
            parser.error("--job needs --before DIR")
        job, job_lines = job_rates(args.job, os.path.abspath(args.before), args.rounds)
        header = f"{os.cpu_count()} cores ({cpu_model()}), shared with other work while it ran."
        save(args.out, f"decode_path_job_{os.cpu_count()}core", job, "\n".join([header, *job_lines]))
        return 0
    sets = image_sets()
    results = {"cores": os.cpu_count(), "cpu": cpu_model(), "rounds": args.rounds, "cases": {}}
    lines = [f"{results['cores']} cores ({results['cpu']}), shared with other work while it ran; one thread; "
             f"ms per image for decode + input tensor (Detector.prepare's work); {args.rounds} rounds per case, the "
             "arms alternating in one process (order flipped each round), each arm's median round; the ratio is "
             "the median of the per-round ratios. Pixel error: mean |arm - reference| on 0..255 of the 300x300 "
             "stretched input, reference = full decode + Pillow Lanczos or box filter (antialiased, no reducing gap).",
             "", "| input | images | n | pillow ms | fastjpeg ms | fastjpeg / pillow | pixel error vs Lanczos: pillow | "
             "fastjpeg | vs box: pillow | fastjpeg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for width, height, mode in CASES:
        for name, datas in sets.items():
            rounds: dict[str, list[float]] = {a: [] for a in ARMS}
            tensors = {}
            for r in range(args.rounds):
                for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):
                    ms, tensors[arm] = prepare_all(datas, arm, width, height, mode)
                    rounds[arm].append(ms)
            fastjpeg.ENABLED = True
            ratio = statistics.median(f / p for f, p in zip(rounds["fastjpeg"], rounds["pillow"]))
            refs = references(datas, (width, height)) if mode == "stretch" else {}
            err = {f"{a} vs {r}": pixel_error(tensors[a], refs[r]) for r in refs for a in ARMS}
            med = {a: statistics.median(v) for a, v in rounds.items()}
            key = f"{width}x{height} {mode} | {name}"
            results["cases"][key] = {"rounds_ms": rounds, "median_ms": med, "ratio": ratio, "pixel_error": err}
            errs = " | ".join(f"{err[f'{a} vs {r}']:.2f}" if err else "" for r in ("lanczos", "box") for a in ARMS)
            lines.append(f"| {width}x{height} {mode} | {name} | {len(datas)} | {med['pillow']:.2f} | "
                         f"{med['fastjpeg']:.2f} | {ratio:.2f} | {errs} |")
            print(lines[-1], flush=True)
    save(args.out, f"decode_path_{results['cores']}core", results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
