"""`batch-detect report OUTPUT`: a run's numbers in the terminal, and an HTML folder with the same numbers,
a score histogram and a gallery of images with their boxes drawn (read back from their URIs through
fsspec), plus failure examples with their messages. Pillow draws everything; no plotting library."""

from __future__ import annotations

import heapq
import html
import os
import tempfile
from collections import Counter

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ..inputs.containers import iter_parquet, iter_tar, raising
from ..errors import ReadError
from ..inputs.plan import Shard
from ..model.preprocess import decode_image
from ..inputs.reading import Reader
from ..output.records import retryable_by_type
from ..output.sink import MANIFEST, OutputStore

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
MAX_SIDE = 640


def colour(class_id: int) -> tuple[int, int, int]:
    return PALETTE[class_id % len(PALETTE)]


def _batches(store: OutputStore, name: str, columns: list[str]):
    """The table's rows as record batches, one part file at a time: memory stays flat in the output size."""
    for path in store.part_files(name):
        with store.fs.open(path, "rb") as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=65536, columns=columns)


def summarize(output: str, storage_options: dict | None = None, samples: int = 12) -> dict:
    """The numbers, aggregated in one streaming pass, and the gallery's picks: the best-scoring images
    and a few without detections (heaps of `samples`, not the tables)."""
    store = OutputStore(output, storage_options)
    manifest = store.read_json(MANIFEST)
    bins = [0] * 10
    per_class: Counter = Counter()
    best: dict[str, float] = {}  # uri -> best score, for at most `samples` uris
    for b in _batches(store, "detections", ["uri", "class_id", "label", "score"]):
        for uri, cid, lab, score in zip(*(b.column(i).to_pylist() for i in range(4))):
            bins[min(int(score * 10), 9)] += 1
            per_class[lab if lab is not None else f"class {cid}"] += 1
            if uri in best or len(best) < samples or score > min(best.values()):
                best[uri] = max(score, best.get(uri, 0.0))
                if len(best) > samples:
                    del best[min(best, key=lambda u: (best[u], u))]
    empty: list[str] = []
    no_detections = 0
    for b in _batches(store, "images", ["uri", "num_detections"]):
        for uri, n in zip(b.column(0).to_pylist(), b.column(1).to_pylist()):
            if n == 0:
                no_detections += 1
                empty = heapq.nsmallest(max(1, samples // 4), empty + [uri])
    failure_types: Counter = Counter()
    failure_rows: list[tuple] = []
    for b in _batches(store, "failures", ["uri", "stage", "error_type", "message"]):
        for row in zip(*(b.column(i).to_pylist() for i in range(4))):
            failure_types[f"{row[1]}/{row[2]}"] += 1
            if len(failure_rows) < 20:
                failure_rows.append(row)
    return {
        "manifest": manifest, "per_class": per_class.most_common(), "score_bins": bins,
        "failure_types": failure_types.most_common(), "failure_rows": failure_rows,
        "retryable": retryable_by_type(store) if failure_types else {},
        "no_detections": no_detections,
        "best": sorted(best, key=lambda u: (-best[u], u)), "empty": empty,
        "output": output,
    }


def render_text(summary: dict) -> str:
    m = summary["manifest"]
    c, t = m.get("counts", {}), m.get("timings", {})
    rate = t.get("images_per_s")
    lines = [
        f"run {m['run_id']} ({m['status']}), model {m['model']['uri']} [{m['model'].get('family')}]",
        f"images: {c.get('listed')} listed, {c.get('images')} processed, {c.get('failures')} failed, "
        f"{summary['no_detections']} with no detections",
        f"throughput: {rate:.1f} images/s" if rate else "throughput: n/a",
        "detections per class: " + (", ".join(f"{k} {v}" for k, v in summary["per_class"]) or "none"),
        "scores: " + " ".join(f"{i / 10:.1f}-{(i + 1) / 10:.1f}:{n}" for i, n in enumerate(summary["score_bins"]) if n),
        "failures: " + (", ".join(f"{k} {v}" for k, v in summary["failure_types"]) or "none"),
        *([f"retryable (latest record a failure; --retry-failures STAGE[/TYPE]): "
           + ", ".join(f"{k} {v}" for k, v in summary["retryable"].items())] if summary.get("retryable") else []),
        # the run's own warnings: e.g. why classes show as "class 1" (no labels)
        *(f"warning: {w}" for w in m.get("warnings", [])),
    ]
    if len(m.get("runs", [])) > 1:  # an incremental output: what each run added
        lines.insert(2, "runs: " + ", ".join(
            f"{r['run_id']} ({r['finished_at'][:10]}: {r['images'] + r['failures']} processed, "
            f"{r['new'] if r.get('new') is not None else r['planned']} new, {r.get('changed') or 0} changed)"
            for r in m["runs"]))
    return "\n".join(lines)


KEYPOINT_FILL = (255, 255, 255)  # a white dot ringed in the box's colour: visible on any photo


def draw_boxes(image: Image.Image, boxes: list[tuple]) -> Image.Image:
    """boxes: (class_id, label, score, xmin, ymin, xmax, ymax[, keypoints]) normalised to the image; keypoints
    (a list of {x, y}, MediaPipe models' eyes, nose, ...) are drawn as dots."""
    image = image.copy()
    scale = min(1.0, MAX_SIDE / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(image)
    w, h = image.size
    width = max(2, round(min(w, h) / 150))
    for class_id, label, score, x0, y0, x1, y1, *rest in boxes:
        box = (x0 * w, y0 * h, x1 * w, y1 * h)
        draw.rectangle(box, outline=colour(class_id), width=width)
        r = width + 1
        for point in (rest[0] if rest else None) or []:
            px, py = point["x"] * w, point["y"] * h
            draw.ellipse((px - r, py - r, px + r, py + r), fill=KEYPOINT_FILL, outline=colour(class_id), width=1)
        text = f"{label if label is not None else class_id} {score:.2f}"
        tx, ty = box[0] + width, max(0, box[1] - 12)
        draw.rectangle((tx - 1, ty, tx + 6 * len(text) + 1, ty + 11), fill=colour(class_id))
        draw.text((tx, ty), text, fill=(255, 255, 255))
    return image


def histogram_png(bins: list[int], path: str) -> None:
    w, h, pad = 420, 200, 24
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    top = max(bins) or 1
    bar = (w - 2 * pad) / len(bins)
    for i, n in enumerate(bins):
        x0 = pad + i * bar
        y = h - pad - (h - 2 * pad) * n / top
        draw.rectangle((x0 + 2, y, x0 + bar - 2, h - pad), fill=(0, 130, 200))
        draw.text((x0 + 2, h - pad + 4), f"{i / 10:.1f}", fill=(0, 0, 0))
        if n:
            draw.text((x0 + 2, y - 12), str(n), fill=(0, 0, 0))
    img.save(path)


def _read_back(uris: list[str], manifest: dict, reader: Reader) -> dict:
    """A bytes getter per chosen image: files are read directly; tar members by streaming each tar
    holding one once; Parquet rows by their `<file>#<row>` name (rows named by an id column are not
    read back, as the output does not record their file)."""
    form = manifest.get("plan", {}).get("form", "files")
    cfg = manifest.get("config", {})
    getters = {}
    if form == "files":
        return {u: (lambda u=u: reader.read(u)) for u in uris}
    wanted = set(uris)
    if form == "tar":
        for tar in sorted({u.split("#", 1)[0] for u in uris}):
            for uri, get in iter_tar(tar, reader.filesystem(tar), tuple(cfg.get("extensions", ())), {}):
                if uri in wanted:
                    getters[uri] = get
    elif form == "parquet" and not cfg.get("id_column"):
        for uri in uris:
            source, row = uri.rsplit("#", 1)
            part = Shard("report", (uri,), form="parquet", source=source, start=int(row))
            getters.update(iter_parquet(part, reader.filesystem(source), cfg.get("image_column")))
    missing = ReadError(f"{form} input: this image cannot be read back for the gallery")
    return {u: getters.get(u, raising(missing)) for u in uris}


def default_html_folder(output: str, manifest: dict) -> str:
    """Beside the results for a local output (in a folder the tool owns, which readers' globs skip), never in
    the current folder, which `ray job submit --working-dir .` would upload; in the temp folder for an object
    store (the HTML is written locally)."""
    name = f"run-{manifest['run_id']}"
    if output.startswith("file://") or "://" not in output:
        return os.path.join(os.path.abspath(os.path.expanduser(output.removeprefix("file://"))), "_report", name)
    return os.path.join(tempfile.gettempdir(), f"batch-detect-report-{manifest['output_id'][:12]}", name)


def write_html(summary: dict, folder: str, samples: int = 12, storage_options: dict | None = None) -> str:
    os.makedirs(os.path.join(folder, "gallery"), exist_ok=True)
    histogram_png(summary["score_bins"], os.path.join(folder, "scores.png"))
    # Best-scoring images first, then some without detections: what a reviewer wants to see.
    ranked, empty = summary["best"], summary["empty"]
    chosen = ranked[: max(1, samples - min(len(empty), samples // 4))] + empty[: samples // 4]
    chosen = chosen[:samples]
    wanted = set(chosen)
    by_uri: dict[str, list] = {}
    store = OutputStore(summary["output"], storage_options)
    columns = ["uri", "class_id", "label", "score", "xmin", "ymin", "xmax", "ymax"]
    parts = store.part_files("detections")
    if parts:  # outputs of every layout since keypoints existed have them; read them where they are
        with store.fs.open(parts[0], "rb") as fh:
            if "keypoints" in pq.ParquetFile(fh).schema_arrow.names:
                columns.append("keypoints")
    for b in _batches(store, "detections", columns):
        for row in zip(*(b.column(i).to_pylist() for i in range(len(columns)))):
            if row[0] in wanted:
                by_uri.setdefault(row[0], []).append(row[1:])
    blobs = _read_back(chosen, summary["manifest"], Reader(storage_options))
    cards = []
    for i, uri in enumerate(chosen):
        try:
            decoded = decode_image(blobs[uri](), 10**9)
        except Exception as exc:  # the input may have moved since the run
            cards.append(f"<figure><figcaption>{html.escape(uri)}: cannot read back ({html.escape(str(exc))})"
                         "</figcaption></figure>")
            continue
        name = f"gallery/{i:03d}.png"
        draw_boxes(decoded.image, by_uri.get(uri, [])).save(os.path.join(folder, name))
        caption = ", ".join(f"{b[1] if b[1] is not None else b[0]} {b[2]:.2f}" for b in by_uri.get(uri, [])) or "no detections"
        cards.append(f'<figure><img src="{name}" alt="{html.escape(uri)}"><figcaption>'
                     f"{html.escape(os.path.basename(uri))}: {html.escape(caption)}</figcaption></figure>")
    failure_rows = "".join(
        f"<tr><td>{html.escape(u)}</td><td>{html.escape(s)}</td><td>{html.escape(e)}</td><td>{html.escape(m)}</td></tr>"
        for u, s, e, m in summary["failure_rows"])
    text = html.escape(render_text(summary))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>batch_detect report run {html.escape(str(summary['manifest']['run_id']))}</title>
<style>body{{font-family:sans-serif;margin:2em}} pre{{background:#f4f4f4;padding:1em}}
.gallery{{display:flex;flex-wrap:wrap;gap:1em}} figure{{margin:0;max-width:320px}} img{{max-width:320px}}
table{{border-collapse:collapse}} td{{border:1px solid #ccc;padding:4px;font-size:90%}}</style></head>
<body><h1>batch_detect report</h1>
<pre>{text}</pre>
<h2>Score distribution</h2><img src="scores.png" alt="score histogram">
<h2>Gallery</h2><div class="gallery">{''.join(cards)}</div>
<h2>Failures</h2><table><tr><td>uri</td><td>stage</td><td>error type</td><td>message</td></tr>{failure_rows}</table>
</body></html>"""
    index = os.path.join(folder, "index.html")
    with open(index, "w") as fh:
        fh.write(page)
    return index
