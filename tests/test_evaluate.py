"""Metrics against hand-computed values: IoU (mmseg semantics), sliding windows, depth, COCO mAP."""

import math

import numpy as np
import pytest
import torch

from vitsplit.evaluate import DepthMetric, IoUMetric, coco_map, slide_inference, slide_windows


def test_iou_hand_example_with_ignore_and_absent_class():
    # Pairs (pred, label) after dropping the ignored pixel: (0,0) (0,1) (1,1) (2,2) (2,0).
    # class 0: I=1, P=2, L=2 -> U=3 -> 1/3; class 1: I=1, P=1, L=2 -> 1/2; class 2: I=1, P=2, L=1 -> 1/2;
    # class 3 appears nowhere -> NaN, left out of the mean. aAcc = 3 correct / 5 labelled.
    m = IoUMetric(num_classes=4, ignore_index=255)
    m.update(torch.tensor([[0, 0, 1], [1, 2, 2]]), torch.tensor([[0, 1, 1], [255, 2, 0]]))
    r = m.compute()
    assert r["IoU"][:3] == pytest.approx([100 / 3, 50.0, 50.0])
    assert math.isnan(r["IoU"][3])
    assert r["mIoU"] == pytest.approx((100 / 3 + 50 + 50) / 3)
    assert r["aAcc"] == pytest.approx(60.0)
    # per-class accuracy I/L: 1/2, 1/2, 1/1 -> mean 2/3
    assert r["mAcc"] == pytest.approx(200 / 3)


def test_iou_sums_over_the_dataset_not_per_image():
    # image 1 perfect (class 0: I=4, P=4, L=4); image 2 predicts 1 where the label is 0.
    # Dataset sums: class 0 I=4, U=5 -> 0.8; class 1 I=0, U=1 -> 0 => mIoU 40.
    # (The mean of per-image mIoUs would be (100 + 0) / 2 = 50.)
    m = IoUMetric(num_classes=2)
    m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    m.update(torch.ones(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, dtype=torch.long))
    r = m.compute()
    assert r["IoU"] == pytest.approx([80.0, 0.0])
    assert r["mIoU"] == pytest.approx(40.0)
    assert r["aAcc"] == pytest.approx(80.0)


def test_iou_all_ignored_gives_nan_not_zero():
    m = IoUMetric(num_classes=3)
    m.update(torch.tensor([1, 2]), torch.tensor([255, 255]))
    r = m.compute()
    assert all(math.isnan(v) for v in r["IoU"]) and math.isnan(r["mIoU"])


def test_slide_windows_follow_mmseg_grid():
    # 5 x 7 image, crop 3, stride 2: rows (0,3),(2,5); columns (0,3),(2,5),(4,7) (last moved back to the border)
    w = slide_windows(5, 7, crop=3, stride=2)
    assert [(a, b) for a, b, _, _ in w[::3]] == [(0, 3), (2, 5)]
    assert [(c, d) for _, _, c, d in w[:3]] == [(0, 3), (2, 5), (4, 7)]
    assert len(w) == 6
    assert slide_windows(2, 2, crop=3, stride=2) == [(0, 2, 0, 2)]  # image smaller than the crop: one window


def test_slide_inference_averages_overlaps():
    x = torch.randn(2, 3, 9, 11)
    pointwise = slide_inference(lambda t: t[:, :2] * 2, x, num_classes=2, crop=4, stride=3)
    assert torch.allclose(pointwise, x[:, :2] * 2, atol=1e-6)  # per-pixel model: overlaps average to itself
    # a model whose output is the window's own offset shows the averaging: each pixel gets the mean
    # over the windows that cover it; pixel (0, 0) is covered by one window only
    calls = []

    def window_id(t):
        calls.append(t.shape[-2:])
        return torch.full((t.shape[0], 1, *t.shape[-2:]), float(len(calls)))

    out = slide_inference(window_id, x, num_classes=1, crop=4, stride=3)
    assert len(calls) == len(slide_windows(9, 11, 4, 3)) == 3 * 4
    assert out[0, 0, 0, 0].item() == 1.0
    assert out[0, 0, 3, 3].item() == pytest.approx((1 + 2 + 5 + 6) / 4)  # rows 0-3 & 3-6, cols 0-3 & 3-6


def test_depth_metrics_by_hand():
    # valid pixels (gt > 0): (pred, gt) = (2, 1), (1, 1), (4, 4)
    m = DepthMetric()
    m.update(torch.tensor([[[2.0, 1.0], [4.0, 0.5]]]), torch.tensor([[[1.0, 1.0], [4.0, 0.0]]]))
    r = m.compute()
    assert r["AbsRel"] == pytest.approx(1 / 3)
    assert r["RMSE"] == pytest.approx(math.sqrt(1 / 3))
    assert r["delta1"] == pytest.approx(200 / 3)
    # a second, perfect image: metrics are averaged per image
    m.update(torch.full((1, 1, 2, 2), 3.0), torch.full((1, 2, 2), 3.0))
    r = m.compute()
    assert r["AbsRel"] == pytest.approx(1 / 6) and r["RMSE"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert r["delta1"] == pytest.approx((200 / 3 + 100) / 2) and r["images"] == 2


def _targets():
    boxes = [np.array([[4, 4, 20, 24], [30, 10, 50, 40]], np.float32), np.array([[10, 30, 40, 60]], np.float32)]
    labels = [np.array([1, 2]), np.array([2])]
    out = []
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        masks = np.zeros((len(b), 64, 64), np.uint8)
        for j, (x1, y1, x2, y2) in enumerate(b.astype(int)):
            masks[j, y1:y2, x1:x2] = 1
        out.append({"image_id": i, "height": 64, "width": 64, "boxes": b, "labels": lab, "masks": masks})
    return out


def _preds(targets, shift=0):
    preds = []
    for t in targets:
        b = torch.tensor(t["boxes"]) + shift
        m = torch.tensor(np.roll(t["masks"], shift, axis=(1, 2)), dtype=torch.float32)[:, None]
        preds.append({"boxes": b, "labels": torch.tensor(t["labels"]), "scores": torch.ones(len(b)), "masks": m})
    return preds


def test_coco_map_perfect_is_100_and_shifted_is_lower():
    t = _targets()
    perfect = coco_map(t, _preds(t), num_classes=2, with_masks=True)
    assert perfect["bbox_mAP"] == pytest.approx(100.0) and perfect["segm_mAP"] == pytest.approx(100.0)
    assert perfect["bbox_mAP_50"] == pytest.approx(100.0)
    shifted = coco_map(t, _preds(t, shift=4), num_classes=2, with_masks=True)
    # A 4 px diagonal shift gives box IoUs: class 1's 16x20 box 192/448 = 0.43 (a miss at 0.5);
    # class 2's 20x30 box 416/784 = 0.53 and 30x30 box 676/1124 = 0.60 (hits at 0.5, misses at
    # 0.75). AP50 = mean(0, 100) = 50; AP75 = 0; AP (0.50:0.95) is far lower. Masks are the same
    # rectangles, so segm equals bbox.
    assert shifted["bbox_mAP_50"] == pytest.approx(50.0) and shifted["bbox_mAP_75"] == 0.0
    assert 0.0 < shifted["bbox_mAP"] < 20.0
    assert shifted["segm_mAP"] == pytest.approx(shifted["bbox_mAP"])
    wrong_class = _preds(t)
    wrong_class[1]["labels"] = torch.tensor([1])
    assert coco_map(t, wrong_class, num_classes=2, with_masks=False)["bbox_mAP"] < 100.0


class Oracle(torch.nn.Module):
    """Returns the dataset's own targets for the images it is shown, in order (for end-to-end checks)."""

    def __init__(self, dataset, task):
        super().__init__()
        self.dataset, self.task, self.next = dataset, task, 0

    def forward(self, images):
        items = [self.dataset[self.next + i] for i in range(images.shape[0])]
        self.next += images.shape[0]
        if self.task == "seg":
            return (
                torch.nn.functional.one_hot(torch.stack([it["seg"] for it in items]), self.dataset.num_classes)
                .permute(0, 3, 1, 2)
                .float()
            )
        if self.task == "depth":
            return torch.stack([it["depth"] for it in items])[:, None]
        return [
            {
                "boxes": it["boxes"],
                "labels": it["labels"],
                "scores": torch.ones(len(it["labels"])),
                "masks": it["masks"][:, None].float(),
            }
            for it in items
        ]


@pytest.mark.parametrize("task", ["seg", "det", "depth"])
def test_evaluate_model_end_to_end_on_synthetic_with_perfect_predictions(task):
    from vitsplit.data import build_dataset
    from vitsplit.evaluate import evaluate_model

    ds = build_dataset("synthetic:size=48,classes=3", "val", task=task, crop=48, length=5)
    r = evaluate_model(Oracle(ds, task), ds, task, batch_size=2)
    assert r["num_images"] == 5
    if task == "seg":
        assert r["mIoU"] == pytest.approx(100.0) and r["aAcc"] == pytest.approx(100.0)
    elif task == "depth":
        assert r["AbsRel"] == pytest.approx(0.0) and r["RMSE"] == pytest.approx(0.0) and r["delta1"] == 100.0
    else:
        assert r["bbox_mAP"] == pytest.approx(100.0) and r["segm_mAP"] == pytest.approx(100.0)


@pytest.mark.parametrize("precision,expected", [("fp32", None), ("auto", torch.bfloat16), ("bf16", torch.bfloat16)])
def test_evaluate_checkpoint_uses_the_runs_precision(monkeypatch, precision, expected):
    """On CUDA, `cka-split evaluate` must evaluate an fp32 run in fp32 (as its eval.json was), not bf16."""
    import vitsplit.evaluation.evaluate as ev

    class Stub:
        def to(self, device):
            return self

    seen = {}
    cfg = {
        "task": "seg",
        "data": "synthetic:size=16,classes=2",
        "crop": 16,
        "seed": 0,
        "val_length": 1,
        "precision": precision,
    }
    monkeypatch.setattr(ev, "load_trained", lambda path: (Stub(), cfg))
    monkeypatch.setattr(ev, "resolve_device", lambda pref: torch.device("cuda"))
    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **kw: seen.update(kw) or {})
    ev.evaluate_checkpoint("run")
    assert seen["autocast_dtype"] is expected
