import numpy as np
import pytest

from batch_detect.model.decoding import confirm_by_values, decode_ssd, identify_ssd_outputs
from batch_detect.errors import ModelError, PostprocessError
from batch_detect.model.interpreter import TensorSpec


def t(index, name, shape):
    return TensorSpec(index, name, shape, shape, "float32", 0.0, 0)


TF1 = [t(10, "TFLite_Detection_PostProcess", (1, 5, 4)), t(11, "TFLite_Detection_PostProcess:1", (1, 5)),
       t(12, "TFLite_Detection_PostProcess:2", (1, 5)), t(13, "TFLite_Detection_PostProcess:3", (1,))]
# TF2 Object Detection API exports: listed scrambled, and named in reverse op order
# (as exported here by tools/make_fixture_models.py and by the TF2 detection zoo).
TF2 = [t(7, "StatefulPartitionedCall:1", (1, 5)), t(8, "StatefulPartitionedCall:3", (1, 5, 4)),
       t(5, "StatefulPartitionedCall:0", (1,)), t(6, "StatefulPartitionedCall:2", (1, 5))]
# Signature outputs named in op order, listed scrambled.
TF2_OP_ORDER = [t(7, "StatefulPartitionedCall:1", (1, 5)), t(5, "StatefulPartitionedCall:3", (1,)),
                t(8, "StatefulPartitionedCall:0", (1, 5, 4)), t(6, "StatefulPartitionedCall:2", (1, 5))]


def arrays_for(layout):
    boxes = np.array([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.4, 0.4],
                       [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
    return {
        layout.boxes.index: boxes,
        layout.classes.index: np.array([[2, 0, 1, 0, 0]], np.float32),
        layout.scores.index: np.array([[0.9, 0.6, 0.2, 0.0, 0.0]], np.float32),
        layout.count.index: np.array([3], np.float32),
    }


@pytest.mark.parametrize("outputs,classes_index", [(TF1, 11), (TF2, 6), (TF2_OP_ORDER, 7)],
                         ids=["tf1-order", "tf2-scrambled-reversed-names", "tf2-scrambled-op-names"])
def test_all_output_orders_decode_the_same(outputs, classes_index):
    layout = identify_ssd_outputs(outputs)
    assert layout.boxes.shape == (1, 5, 4) and layout.count.shape == (1,)
    assert layout.classes.index == classes_index
    det = decode_ssd(arrays_for(layout), layout, 0.5)
    assert det.class_ids.tolist() == [2, 0]
    assert det.scores.tolist() == pytest.approx([0.9, 0.6])
    assert det.boxes[0].tolist() == pytest.approx([0.1, 0.2, 0.5, 0.6])


def test_count_limits_detections_and_threshold_zero_keeps_all_counted():
    layout = identify_ssd_outputs(TF2)
    det = decode_ssd(arrays_for(layout), layout, 0.0)
    assert len(det.scores) == 3


def test_values_correct_names_that_lie():
    layout = identify_ssd_outputs(TF2)
    arrays = arrays_for(layout)
    swapped = {**arrays, layout.classes.index: arrays[layout.scores.index],
               layout.scores.index: arrays[layout.classes.index]}
    fixed = confirm_by_values(layout, swapped)
    assert (fixed.classes.index, fixed.scores.index) == (layout.scores.index, layout.classes.index)
    assert confirm_by_values(layout, arrays) == layout


def test_named_outputs_are_identified_by_name():
    outs = [t(0, "detection_scores", (1, 5)), t(1, "detection_boxes", (1, 5, 4)),
            t(2, "num_detections", (1,)), t(3, "detection_classes", (1, 5))]
    layout = identify_ssd_outputs(outs)
    assert (layout.scores.index, layout.classes.index) == (0, 3)


def test_non_detection_models_are_refused():
    with pytest.raises(ModelError, match="has 1 output"):
        identify_ssd_outputs([t(0, "logits", (1, 1000))])
    ambiguous = [t(0, "a", (1, 5)), t(1, "b", (1, 5, 4)), t(2, "c", (1,)), t(3, "d", (1, 5))]
    with pytest.raises(ModelError, match="cannot tell the classes output"):
        identify_ssd_outputs(ambiguous)


def test_quantized_outputs_are_dequantized():
    outs = [TensorSpec(0, "x:0", (1, 2, 4), (1, 2, 4), "uint8", 1 / 255, 0),
            TensorSpec(1, "x:1", (1, 2), (1, 2), "float32", 0.0, 0),
            TensorSpec(2, "x:2", (1, 2), (1, 2), "uint8", 0.5 / 100, 100),
            TensorSpec(3, "x:3", (1,), (1,), "float32", 0.0, 0)]
    layout = identify_ssd_outputs(outs)
    det = decode_ssd({0: np.array([[[51, 51, 255, 255], [0, 0, 0, 0]]], np.uint8),
                      1: np.array([[1, 0]], np.float32), 2: np.array([[200, 100]], np.uint8),
                      3: np.array([2], np.float32)}, layout, 0.25)
    assert det.scores.tolist() == pytest.approx([0.5])
    assert det.boxes[0].tolist() == pytest.approx([0.2, 0.2, 1.0, 1.0])


def test_non_finite_outputs_become_postprocess_failures():
    layout = identify_ssd_outputs(TF2)
    arrays = arrays_for(layout)
    arrays[layout.boxes.index][0, 0, 0] = np.nan
    with pytest.raises(PostprocessError) as e:
        decode_ssd(arrays, layout, 0.5)
    assert e.value.stage == "postprocess" and e.value.error_type == "non_finite_output"


def yolo_spec(shape, dtype="float32", scale=0.0, zp=0):
    return TensorSpec(0, "output0", shape, shape, dtype, scale, zp)


def test_yolov8_transposed_pixels_and_class_aware_nms():
    from batch_detect.model.decoding import YoloLayout, decode_outputs, identify_outputs

    layout = identify_outputs([yolo_spec((1, 4 + 3, 12))])
    assert isinstance(layout, YoloLayout) and layout.transposed and layout.num_classes == 3
    pred = np.zeros((1, 7, 12), np.float32)
    # xc, yc, w, h in pixels of a 100x200 (h x w) input; two overlapping boxes of class 1, one of class 2
    boxes = [(50, 50, 40, 40), (52, 50, 40, 40), (50, 50, 40, 40), (150, 80, 20, 20)]
    for j, (xc, yc, w, h) in enumerate(boxes):
        pred[0, :4, j] = (xc, yc, w, h)
    pred[0, 4 + 1, 0], pred[0, 4 + 1, 1], pred[0, 4 + 2, 2], pred[0, 4 + 0, 3] = 0.9, 0.8, 0.7, 0.6
    det = decode_outputs({0: pred}, layout, 0.5, (100, 200))
    # the second class-1 box is suppressed; the class-2 box at the same place is kept
    assert det.class_ids.tolist() == [1, 2, 0]
    assert det.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert det.boxes[0].tolist() == pytest.approx([0.3, 0.15, 0.7, 0.35])  # ymin, xmin, ymax, xmax


def test_yolov5_objectness_and_quantized_output():
    from batch_detect.model.decoding import YoloLayout, decode_outputs, identify_outputs

    layout = identify_outputs([yolo_spec((1, 10, 5 + 2), "uint8", 1 / 255, 0)])
    assert isinstance(layout, YoloLayout) and layout.objectness and not layout.transposed
    pred = np.zeros((1, 10, 7), np.uint8)
    pred[0, 0, :4] = (128, 128, 51, 51)  # normalised xc, yc, w, h ≈ 0.5, 0.5, 0.2, 0.2
    pred[0, 0, 4], pred[0, 0, 6] = 204, 255  # objectness 0.8 × class-1 score 1.0
    det = decode_outputs({0: pred}, layout, 0.5, (64, 64))
    assert det.class_ids.tolist() == [1] and det.scores.tolist() == pytest.approx([0.8], abs=0.01)
    assert det.boxes[0].tolist() == pytest.approx([0.402, 0.402, 0.602, 0.602], abs=0.01)


@pytest.mark.parametrize("transposed", [True, False])
def test_yolo_scores_and_classes_match_a_per_prediction_reference(transposed):
    """The vectorised decode (max along the layout's axis, argmax only for predictions kept) gives what a
    plain loop over predictions gives: class = argmax of its class scores (first on ties), score = that
    score (× objectness for YOLOv5)."""
    from batch_detect.model.decoding import NMS_IOU, YoloLayout, decode_yolo, nms

    rng = np.random.default_rng(11)
    n, c = 300, 6
    objectness = not transposed
    width = 4 + objectness + c
    rows = np.concatenate([rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.01, 0.05, (n, 2)),
                           rng.random((n, width - 4))], 1).astype(np.float32)
    rows[::7, -c:] = 0.5  # ties: the first class wins
    raw = rows.T[None].copy() if transposed else rows[None]
    layout = YoloLayout(yolo_spec(raw.shape), transposed=transposed, objectness=objectness, num_classes=c,
                        family="yolov8" if transposed else "yolov5")
    det = decode_yolo({0: raw}, layout, 0.4, (64, 64))
    ref = []
    for r in rows:
        k = int(np.argmax(r[-c:]))
        s = r[-c:][k] * (r[4] if objectness else 1.0)
        if s >= 0.4:
            ref.append((r[:4], k, s))
    xywh = np.array([x[0] for x in ref], np.float32)
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    scores = np.array([x[2] for x in ref], np.float32)
    classes = np.array([x[1] for x in ref])
    keep = nms(xyxy, scores, classes, NMS_IOU, 100)
    assert len(ref) > 20 and len(keep) > 5
    assert det.class_ids.tolist() == classes[keep].tolist()
    assert det.scores.tolist() == pytest.approx(scores[keep].tolist())
    np.testing.assert_allclose(det.boxes, xyxy[keep][:, [1, 0, 3, 2]], rtol=1e-6)
