"""`batch-detect compare --model A --reference B --input I`: how far A's detections drift from B's on
the same images (the quantization-drift check): boxes matched at IoU ≥ 0.5 with the same class, recall and
precision of A against B, mean |Δscore| of matched boxes, and the images where they disagree most."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..model.detector import Detector
from ..model.interpreter import load_backend, read_model
from ..inputs.listing import list_input
from ..inputs.reading import Reader


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [N,4] against every box in b [M,4] (xmin, ymin, xmax, ymax)."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = (x1 - x0).clip(0) * (y1 - y0).clip(0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-12)


def match(a, b, threshold: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one matches (index in a, index in b), best-scoring reference boxes first."""
    if len(a.scores) == 0 or len(b.scores) == 0:
        return []
    ious = _iou(a.boxes, b.boxes)
    same = a.class_ids[:, None] == b.class_ids[None, :]
    ious = np.where(same, ious, 0.0)
    pairs, used = [], set()
    for j in np.argsort(-b.scores, kind="stable"):
        cands = [(ious[i, j], i) for i in range(len(a.scores)) if i not in used and ious[i, j] >= threshold]
        if cands:
            _, i = max(cands)
            used.add(i)
            pairs.append((i, int(j)))
    return pairs


def compare(model: str, reference: str, input_url: str, *, sample: int = 200, score_threshold: float = 0.25,
            resize: str = "auto", normalization: str = "auto", labels: list | None = None,
            storage_options: dict | None = None, output_format: str = "auto") -> dict:
    backend = load_backend()

    def detector(url: str) -> Detector:
        return Detector(backend, read_model(url, storage_options), num_threads=os.cpu_count() or 1,
                        score_threshold=score_threshold, resize=resize, normalization=normalization,
                        max_pixels=10**9, model_url=url, output_format=output_format)

    det_a, det_b = detector(model), detector(reference)
    uris = list_input(input_url, (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
                      storage_options).uris
    chosen = uris[:: max(1, len(uris) // sample)][:sample] if sample else uris
    reader = Reader(storage_options)
    rows = []
    for uri in chosen:
        data = reader.read(uri)
        ra, rb = det_a.process(uri, data), det_b.process(uri, data)
        if not hasattr(ra, "detections") or not hasattr(rb, "detections"):
            continue  # an image neither can read is no evidence of drift
        a, b = ra.detections, rb.detections
        pairs = match(a, b)
        dscore = [abs(float(a.scores[i] - b.scores[j])) for i, j in pairs]
        only_a = [i for i in range(len(a.scores)) if i not in {p[0] for p in pairs}]
        only_b = [j for j in range(len(b.scores)) if j not in {p[1] for p in pairs}]

        def names(d, idx):
            return [(labels[int(d.class_ids[k])] if labels and 0 <= d.class_ids[k] < len(labels)
                     else str(int(d.class_ids[k]))) + f" {d.scores[k]:.2f}" for k in idx]

        rows.append({
            "uri": uri, "matched": len(pairs), "model_boxes": len(a.scores), "reference_boxes": len(b.scores),
            "mean_abs_dscore": float(np.mean(dscore)) if dscore else 0.0,
            # one unit per box only one model found, plus the score drift of the matched ones
            "disagreement": len(only_a) + len(only_b) + float(sum(dscore)),
            "only_in_model": "; ".join(names(a, only_a)), "only_in_reference": "; ".join(names(b, only_b)),
        })
    matched = sum(r["matched"] for r in rows)
    n_a = sum(r["model_boxes"] for r in rows)
    n_b = sum(r["reference_boxes"] for r in rows)
    all_d = [r["mean_abs_dscore"] * r["matched"] for r in rows]
    return {
        "model": model, "reference": reference, "images": len(rows), "matched_boxes": matched,
        "recall": matched / n_b if n_b else 1.0, "precision": matched / n_a if n_a else 1.0,
        "mean_abs_dscore": sum(all_d) / matched if matched else 0.0,
        "worst": sorted(rows, key=lambda r: (-r["disagreement"], r["uri"]))[:10],
        "rows": rows,
    }


def render(result: dict) -> str:
    lines = [f"model {result['model']} against reference {result['reference']} on {result['images']} images",
             f"boxes matched (IoU >= 0.5, same class): {result['matched_boxes']}; recall {result['recall']:.3f}, "
             f"precision {result['precision']:.3f}, mean |dscore| {result['mean_abs_dscore']:.3f}",
             "worst images:", f"  {'disagreement':>12}  {'image':<32} only in model / only in reference"]
    for r in result["worst"]:
        lines.append(f"  {r['disagreement']:12.2f}  {os.path.basename(r['uri']):<32} "
                     f"{r['only_in_model'] or '-'} / {r['only_in_reference'] or '-'}")
    return "\n".join(lines)


def write(result: dict, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(result["rows"]), os.path.join(folder, "compare.parquet"))
    with open(os.path.join(folder, "compare.json"), "w") as fh:
        json.dump({k: v for k, v in result.items() if k != "rows"}, fh, indent=2)
