"""Per-image CPU outside the interpreter (issue #14), one thread: `Detector.prepare` (decode, resize,
input tensor) and output decoding (`_postprocess`), beside the invoke they surround, for this checkout and
an earlier one (`--before DIR`, a worktree), alternating in one process so drift hits both alike.

Cases: the benchmark SSD (300x300 uint8, stretch) and, where ../shared has it, the real YOLOv8n (640x640
float input, stretch and letterbox) on the benchmark JPEGs (640x480 to 1920x1080), 12-megapixel JPEGs and
12-megapixel PNGs (no JPEG draft: the resize's reducing gap is what helps there).

    python benchmarks/prepare_cost.py [--before DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SSD = os.path.join(ROOT, "benchmarks", "models", "ssd_mobilenet_v2_300_uint8.tflite")
YOLO = os.path.join(os.path.dirname(ROOT), "shared", "realworld", "yolov8n_int8.tflite")
DATA = os.path.join(ROOT, "benchmarks", "data")


def image_sets() -> dict[str, list[str]]:
    from bench import make_images
    from batch_detect.synthetic import draw_scene, scene_rng

    sets = {"bench JPEGs": make_images(os.path.join(DATA, "images"), 100)}
    for fmt, count in (("jpg", 8), ("png", 3)):
        folder = os.path.join(DATA, f"photos_12mp_{fmt}")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for i in range(count):
            path = os.path.join(folder, f"p{i}.{fmt}")
            if not os.path.exists(path):
                img = draw_scene(scene_rng(12, i), 4000, 3000)[0]
                img.save(path, **({"quality": 90} if fmt == "jpg" else {}))
            paths.append(path)
        sets[f"12 MP {fmt.upper()}s"] = paths
    return sets


def cases() -> list[tuple[str, str, str, str]]:
    """(label, model path, resize mode, image set)"""
    out = [("SSD 300 uint8, stretch", SSD, "stretch", s) for s in ("bench JPEGs", "12 MP JPGs", "12 MP PNGs")]
    if os.path.exists(YOLO):
        out += [("YOLOv8n 640 float, stretch", YOLO, "stretch", "bench JPEGs"),
                ("YOLOv8n 640 float, letterbox", YOLO, "letterbox", "bench JPEGs"),
                ("YOLOv8n 640 float, letterbox", YOLO, "letterbox", "12 MP JPGs")]
    return out


def load_arms(before: str | None) -> dict:
    """{arm: Detector class}. The earlier checkout's package is copied under another name, so both arms
    live in this one process and alternate case by case (separate processes drifted ±15% here)."""
    from batch_detect.model.detector import Detector

    arms = {}
    if before:
        folder = tempfile.mkdtemp(prefix="prepare_cost_")
        shutil.copytree(os.path.join(before, "batch_detect"), os.path.join(folder, "batch_detect_before"))
        sys.path.insert(0, folder)
        arms["before"] = importlib.import_module("batch_detect_before.detector").Detector
    arms["now"] = Detector
    return arms


def measure(detector_cls, backend, model: str, mode: str, datas: list[bytes]) -> dict:
    from batch_detect.model.interpreter import read_model

    det = detector_cls(backend, read_model(model), num_threads=1, score_threshold=0.25, resize=mode,
                       normalization="auto", max_pixels=10**9)
    t0 = time.perf_counter()
    prepared = [det.prepare(d) for d in datas]
    prepare_ms = (time.perf_counter() - t0) * 1000 / len(datas)
    sample = prepared[:3]
    t0 = time.perf_counter()
    outputs = [det.infer(p[2]) for p in sample]
    invoke_ms = (time.perf_counter() - t0) * 1000 / len(sample)
    t0 = time.perf_counter()
    for _ in range(10):
        for p, arrays in zip(sample, outputs):
            det._postprocess("u", p[0], p[1], p[3], p[4], arrays, 0.0)
    post_ms = (time.perf_counter() - t0) * 1000 / (10 * len(sample))
    return {"prepare_ms": prepare_ms, "postprocess_ms": post_ms, "invoke_ms": invoke_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="an earlier checkout of this repository (git worktree add)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    from bench import cpu_model, save
    from batch_detect.model.interpreter import load_backend

    sets = image_sets()
    arms = load_arms(args.before)
    backend = load_backend()
    results = {"cores": os.cpu_count(), "cpu": cpu_model(), "repeat": args.repeat, "before": args.before,
               "cases": {}}
    lines = [f"{results['cores']} cores ({results['cpu']}); one thread; ms per image; each case alternates the "
             f"arms {args.repeat} times in one process and keeps each arm's fastest round"
             + (f"; before = {args.before}" if args.before else ""), "",
             "| case | images | arm | prepare | postprocess | outside invoke | invoke | outside / invoke | before / now |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, model, mode, set_name in cases():
        datas = [open(p, "rb").read() for p in sets[set_name]]
        rounds: dict[str, list[dict]] = {a: [] for a in arms}
        for _ in range(args.repeat):
            for arm, cls in arms.items():
                rounds[arm].append(measure(cls, backend, model, mode, datas))
        best = {a: {k: min(r[k] for r in rs) for k in rs[0]} for a, rs in rounds.items()}
        results["cases"][f"{label} | {set_name}"] = {"rounds": rounds, "best": best}
        for arm, b in best.items():
            outside = b["prepare_ms"] + b["postprocess_ms"]
            ratio = ""
            if arm == "now" and "before" in best:
                ratio = f"{(best['before']['prepare_ms'] + best['before']['postprocess_ms']) / outside:.2f}x"
            lines.append(f"| {label} | {set_name} | {arm} | {b['prepare_ms']:.1f} | {b['postprocess_ms']:.2f} | "
                         f"{outside:.1f} | {b['invoke_ms']:.1f} | {outside / b['invoke_ms']:.2f} | {ratio} |")
    save(args.out, f"prepare_cost_{results['cores']}core", results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
