"""vitsplit.data: specs, synthetic scenes, the mmseg pipelines, folder/COCO layouts and their errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitsplit.data import build_dataset, collate, denormalize, parse_spec
from vitsplit.data import transforms as T
from vitsplit.data.synthetic import SyntheticScenes
from vitsplit.errors import UserError


# ------------------------------------------------------------------ helpers
def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ specs
def test_spec_parsing_and_unknown_prefix():
    s = parse_spec("synthetic:size=64,classes=5")
    assert (s.kind, s.options) == ("synthetic", {"size": 64, "classes": 5})
    c = parse_spec("coco:ann/x.json:imgs")
    assert (c.kind, str(c.annotations), str(c.root)) == ("coco", "ann/x.json", "imgs")
    with pytest.raises(UserError, match="unknown data spec prefix 'imagenet'"):
        build_dataset("imagenet:/x", "train", task="seg", crop=32)
    with pytest.raises(UserError, match="coco:ANNOTATIONS.json:IMAGE_DIR"):
        parse_spec("coco:only.json")
    with pytest.raises(UserError, match="bad synthetic option"):
        parse_spec("synthetic:colour=3")


# ------------------------------------------------------------------ synthetic
def test_synthetic_deterministic_and_split_disjoint():
    a = SyntheticScenes(size=(64, 64), seed=3).load(5)
    b = SyntheticScenes(size=(64, 64), seed=3).load(5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    other_seed = SyntheticScenes(size=(64, 64), seed=4).load(5)
    val = SyntheticScenes(size=(64, 64), seed=3, split="val").load(5)
    assert not np.array_equal(a["image"], other_seed["image"])
    assert not np.array_equal(a["image"], val["image"])


def test_synthetic_zoom_scales_objects_and_keeps_the_rest_of_the_scene():
    """zoom 2 draws the same scene (classes, depths, positions, colours, background) with every object
    twice the radius and twice the texture period: about four times the painted area."""
    assert parse_spec("synthetic:zoom=2,classes=4").options == {"zoom": 2, "classes": 4}
    one, two = SyntheticScenes(size=(112, 112), seed=0), SyntheticScenes(size=(112, 112), seed=0, zoom=2)
    painted1, painted2 = [], []
    for i in range(12):
        a, b = one.load(i), two.load(i)
        assert np.array_equal(a["classes"], b["classes"])
        both_bg = (a["inst"] == -1) & (b["inst"] == -1)
        assert both_bg.mean() > 0.2
        assert np.array_equal(a["image"][both_bg], b["image"][both_bg])  # the background does not zoom
        assert np.array_equal(a["depth"][both_bg], b["depth"][both_bg])
        painted1.append(a["painted"].sum())
        painted2.append(b["painted"].sum())
    ratio = np.sum(painted2) / np.sum(painted1)
    assert 3.0 < ratio < 4.2  # area x4, less what the scene's border clips
    ds = build_dataset("synthetic:zoom=2,length=2", "val", task="seg", crop=56)
    assert ds.source.zoom == 2
    with pytest.raises(UserError, match="zoom"):
        SyntheticScenes(zoom=0)
    with pytest.raises(UserError, match="zoom"):
        build_dataset("synthetic:zoom=9", "train", task="seg", crop=32)


def test_synthetic_rescale_0_trains_at_the_scale_the_scenes_are_drawn_at():
    """rescale=0 keeps crop, flip and photometric distortion but no random 0.5-2x rescale: every
    training label is the scene's own label map or its mirror; with the default some are not."""
    scenes = SyntheticScenes(size=(56, 56), num_classes=8, seed=0, split="train")

    def whole_scene(ds, i):
        seg = ds[i]["seg"].numpy()
        raw = scenes.load(i)["seg"]
        return np.array_equal(seg, raw) or np.array_equal(seg, raw[:, ::-1])

    fixed = build_dataset("synthetic:rescale=0", "train", task="seg", crop=56, length=12)
    default = build_dataset("synthetic", "train", task="seg", crop=56, length=12)
    assert all(whole_scene(fixed, i) for i in range(12))
    assert sum(whole_scene(default, i) for i in range(12)) <= 2
    with pytest.raises(UserError, match="rescale must be 0 or 1"):
        build_dataset("synthetic:rescale=2", "train", task="seg", crop=56)


def test_synthetic_scene_content():
    scenes = SyntheticScenes(size=(112, 112), num_classes=8, seed=0)
    n_classes, occluded, colours = [], 0, {}
    for i in range(30):
        s = scenes.load(i)
        seg, inst, depth = s["seg"], s["inst"], s["depth"]
        objects = np.unique(seg[seg > 0])
        n_classes.append(len(objects))
        visible = np.bincount(inst[inst >= 0].ravel(), minlength=len(s["painted"]))
        assert np.all(visible <= s["painted"])
        occluded += int(np.any((visible < s["painted"]) & (s["painted"] > 0)))
        assert np.all(seg[inst == -1] == 0) and np.all(seg[inst >= 0] == s["classes"][inst[inst >= 0]])
        assert depth[seg == 0].min() >= 10.0 and depth[seg > 0].max() < 9.5  # background far, objects near
        for box, label, mask in zip(s["boxes"], s["labels"], s["masks"].astype(bool)):
            assert 1 <= label <= 8 and np.all(seg[mask] == label)
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            colours.setdefault(int(label), []).append(s["image"][mask].mean(0))
    assert np.mean(n_classes) >= 2.5 and min(n_classes) >= 1
    assert occluded >= 10  # painter's order occludes often
    # colour does not give the class: the mean colour of one class varies a lot between instances
    spread = [np.std(np.stack(c), 0).mean() for c in colours.values() if len(c) >= 5]
    assert spread and min(spread) > 20


def test_synthetic_depth_follows_painter_order():
    s = SyntheticScenes(size=(96, 96), seed=1).load(2)
    means = [s["depth"][s["inst"] == layer].mean() for layer in range(len(s["painted"])) if (s["inst"] == layer).any()]
    assert all(a > b - 0.31 for a, b in zip(means, means[1:]))  # later layers are nearer (up to the tilt)


def test_synthetic_dataset_items_and_classes():
    seg = build_dataset("synthetic:classes=6", "val", task="seg", crop=48, length=3)
    det = build_dataset("synthetic:classes=6", "val", task="det", crop=48, length=3)
    assert (seg.num_classes, det.num_classes, len(seg)) == (7, 6, 3)
    assert seg.class_names[0] == "background" and len(det.class_names) == 6 and seg.ignore_index == 255
    it = seg[0]
    assert it["image"].shape == (3, 48, 48) and it["image"].dtype == torch.float32
    assert it["seg"].dtype == torch.int64 and it["depth"].dtype == torch.float32 and "boxes" not in it
    d = det[0]
    assert d["labels"].min() >= 1 and d["labels"].max() <= 6 and d["masks"].dtype == torch.uint8
    # the unaugmented image is exactly the normalised scene
    raw = SyntheticScenes(size=(48, 48), num_classes=6, split="val", length=3).load(0)
    assert torch.allclose(denormalize(it["image"]), torch.from_numpy(raw["image"]).permute(2, 0, 1) / 255, atol=1e-5)


def test_augmentation_determinism_per_seed_and_epoch():
    ds = build_dataset("synthetic", "train", task="det", crop=48, length=8, seed=7)
    a, b = ds.get(3, epoch=0), ds.get(3, epoch=0)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    assert not torch.equal(a["image"], ds.get(3, epoch=1)["image"])
    ds.set_epoch(1)
    assert torch.equal(ds[3]["image"], ds.get(3, epoch=1)["image"])
    other = build_dataset("synthetic", "train", task="det", crop=48, length=8, seed=8)
    assert not torch.equal(a["image"], other.get(3, epoch=0)["image"])
    for i in range(8):  # boxes are the boxes of the transformed visible masks
        it = ds.get(i, epoch=0)
        assert it["image"].shape == (3, 48, 48) and it["seg"].shape == (48, 48)
        for box, mask in zip(it["boxes"], it["masks"].bool()):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


# ------------------------------------------------------------------ transforms
def test_train_pipeline_keeps_label_aligned_with_image():
    rng = np.random.default_rng(0)
    blocks = rng.integers(1, 3, (8, 12))  # labels 1/2 in 8x8 blocks
    label = np.kron(blocks, np.ones((8, 8), np.int64)).astype(np.uint8)  # (64, 96)
    grey = np.where(label == 1, 200, 50).astype(np.uint8)
    image = np.repeat(grey[..., None], 3, -1)  # grey: saturation/hue leave it grey
    checked = 0
    for seed in range(12):
        out = T.train_pipeline({"image": image, "seg": label}, 32, np.random.default_rng(seed), cat_max_ratio=1.0)
        img, seg = out["image"], out["seg"]
        assert img.shape == (3, 32, 32) and seg.shape == (32, 32)
        assert np.all(img[:, seg == 255] == 0)  # padding: image 0 where label 255
        # interior pixels (3x3 neighbourhood of one label) keep the image order bright > dark
        p = np.pad(seg, 1, constant_values=255)
        same = np.ones_like(seg, bool)
        for dy in range(3):
            for dx in range(3):
                same &= p[dy : dy + 32, dx : dx + 32] == seg
        bright, dark = img[0][same & (seg == 1)], img[0][same & (seg == 2)]
        if len(bright) and len(dark):
            assert bright.min() > dark.max()
            checked += 1
    assert checked >= 8


def test_resize_crop_flip_exact_on_known_arrays():
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    seg = np.arange(24, dtype=np.uint8).reshape(4, 6)
    boxes = np.array([[1, 0, 3, 2]], np.float32)
    s = {"image": image, "seg": seg, "boxes": boxes, "labels": np.array([1])}
    f = T.hflip(s)
    assert np.array_equal(f["seg"][:, 0], seg[:, 5]) and f["boxes"].tolist() == [[3, 0, 5, 2]]
    c = T.crop(s, (1, 3, 2, 6))
    assert np.array_equal(c["seg"], seg[1:3, 2:6]) and c["boxes"].tolist() == [[0, 0, 1, 1]]
    gone = T.crop(s, (2, 4, 0, 6))  # the box lies above the window: dropped with its label
    assert len(gone["boxes"]) == 0 and len(gone["labels"]) == 0
    r = T.resize(s, (8, 12))
    assert np.array_equal(r["seg"], np.kron(seg, np.ones((2, 2), np.uint8)))
    assert r["boxes"].tolist() == [[2, 0, 6, 4]]
    assert T.rescale_size(100, 300, (128, 32)) == (32, 96) and T.rescale_size(50, 400, (128, 32)) == (16, 128)


def test_cat_max_ratio_retries_and_fallback():
    # one class everywhere: never acceptable, so the 11th drawn window is returned
    seg = np.zeros((100, 100), np.uint8)
    got = T.choose_crop(np.random.default_rng(5), seg, 100, 100, 40)
    ref = np.random.default_rng(5)
    windows = [T.crop_bbox(ref, 100, 100, 40) for _ in range(11)]
    assert got == windows[-1]
    # class 1 in columns 80..99: a window passes only if class 0 < 75% of it (x0 in 51..60);
    # pixels marked 255 do not count
    seg[:, 80:] = 1
    seg[:50, :] = 255
    ok = 0
    for s in range(200):
        y0, y1, x0, x1 = T.choose_crop(np.random.default_rng(s), seg, 100, 100, 40)
        cnt = np.bincount(seg[y0:y1, x0:x1].ravel(), minlength=256)[:2]
        ok += cnt.min() > 0 and cnt.max() / cnt.sum() < 0.75
    unconstrained = np.mean([51 <= T.crop_bbox(np.random.default_rng(s), 100, 100, 40)[2] <= 60 for s in range(200)])
    assert unconstrained < 0.3 and ok / 200 > 0.75


def test_photometric_distortion_matches_hsv_round_trip_and_stays_uint8():
    img = _rgb(16, 16, 1)
    # 8-bit hue has 2-degree steps: a round trip is off by at most 255 * 1/60 + rounding ~ 5
    assert np.abs(T.hsv8_to_rgb(T.rgb_to_hsv8(img)).astype(int) - img).max() <= 5
    import colorsys

    for px in img.reshape(-1, 3)[:40]:  # agrees with the float definition (colorsys) up to 8-bit rounding
        h, s, v = colorsys.rgb_to_hsv(*(px / 255.0))
        got = T.rgb_to_hsv8(px[None, None])[0, 0].astype(int)
        assert min(abs(got[0] - h * 180), 180 - abs(got[0] - h * 180)) <= 0.51
        assert abs(got[1] - s * 255) <= 0.51 and got[2] == px.max()
        back = np.array(colorsys.hsv_to_rgb(got[0] / 180, got[1] / 255, got[2] / 255)) * 255
        assert np.abs(T.hsv8_to_rgb(got[None, None].astype(np.uint8))[0, 0] - back).max() <= 0.51
    hsv = T.rgb_to_hsv8(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8))
    assert hsv[0, :, 0].tolist() == [0, 60, 120] and hsv[0, :, 1].tolist() == [255] * 3
    outs = [T.photometric_distortion(img, np.random.default_rng(s)) for s in range(6)]
    assert all(o.dtype == np.uint8 and o.shape == img.shape for o in outs)
    assert sum(not np.array_equal(o, img) for o in outs) >= 4


def test_collate_pads_and_denormalize_inverts():
    a = {
        "image": torch.zeros(3, 4, 5),
        "seg": torch.ones(4, 5, dtype=torch.long),
        "index": 0,
        "boxes": torch.zeros(1, 4),
        "labels": torch.ones(1, dtype=torch.long),
    }
    b = {
        "image": torch.ones(3, 6, 3),
        "seg": torch.ones(6, 3, dtype=torch.long),
        "index": 1,
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
    }
    batch = collate([a, b])
    assert batch["image"].shape == (2, 3, 6, 5) and batch["seg"][0, 5, 0] == 255 and batch["seg"][1, 0, 4] == 255
    assert isinstance(batch["boxes"], list) and batch["index"].tolist() == [0, 1]
    x01 = torch.rand(3, 5, 5)
    assert torch.allclose(
        denormalize(torch.from_numpy(T.normalize((x01 * 255).round().byte().permute(1, 2, 0).numpy()))),
        (x01 * 255).round() / 255,
        atol=1e-5,
    )


# ------------------------------------------------------------------ folder layouts
def _ade(root):
    for split, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            _png(root / "images" / split / f"img{i}.jpg", _rgb(32, 48, i))
            label = np.full((32, 48), 7, np.uint8)
            label[0, 0], label[1, 1], label[2, 2] = 0, 1, 150
            _png(root / "annotations" / split / f"img{i}.png", label)


def test_ade20k_layout_and_reduce_zero_label(tmp_path):
    _ade(tmp_path)
    ds = build_dataset(f"ade20k:{tmp_path}", "val", task="seg", crop=32)
    assert (len(ds), ds.num_classes, len(ds.class_names), ds.class_names[0]) == (1, 150, 150, "wall")
    seg = ds[0]["seg"]  # 48x32 already fits scale (128, 32): no resize
    assert seg.shape == (32, 48)
    assert (seg[0, 0].item(), seg[1, 1].item(), seg[2, 2].item(), seg[5, 5].item()) == (255, 0, 149, 6)
    train = build_dataset(f"ade20k:{tmp_path}", "train", task="seg", crop=32)
    assert len(train) == 2 and train[1]["image"].shape == (3, 32, 32)
    with pytest.raises(UserError, match="no instance annotations"):
        build_dataset(f"ade20k:{tmp_path}", "train", task="det", crop=32)
    with pytest.raises(UserError, match="no depth"):
        build_dataset(f"ade20k:{tmp_path}", "train", task="depth", crop=32)


def test_ade20k_errors_name_the_file(tmp_path):
    _ade(tmp_path)
    bad = tmp_path / "annotations" / "validation" / "img0.png"
    _png(bad, np.full((32, 48), 151, np.uint8))
    ds = build_dataset(f"ade20k:{tmp_path}", "val", task="seg", crop=32)
    with pytest.raises(UserError, match=f"{bad}.*value 151"):
        ds[0]
    _png(bad, np.zeros((30, 48), np.uint8))
    with pytest.raises(UserError, match=f"size mismatch.*img0.jpg.*{bad}"):
        ds[0]
    img = tmp_path / "images" / "validation" / "img0.jpg"
    img.write_bytes(b"not an image")
    with pytest.raises(UserError, match=f"cannot read image {img}"):
        ds[0]
    (tmp_path / "annotations" / "training" / "img1.png").unlink()
    with pytest.raises(UserError, match="no label map for image .*img1.jpg"):
        build_dataset(f"ade20k:{tmp_path}", "train", task="seg", crop=32)
    with pytest.raises(UserError, match="missing ADE20K image folder"):
        build_dataset(f"ade20k:{tmp_path / 'nope'}", "train", task="seg", crop=32)


def test_cityscapes_layout_and_range(tmp_path):
    for split in ("train", "val"):
        _png(tmp_path / "leftImg8bit" / split / "aachen" / "aachen_000000_000019_leftImg8bit.png", _rgb(16, 32))
        lab = np.full((16, 32), 18, np.uint8)
        lab[0, :4] = 255
        _png(tmp_path / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png", lab)
    ds = build_dataset(f"cityscapes:{tmp_path}", "val", task="seg", crop=16)
    assert ds.num_classes == 19 and ds.class_names[-1] == "bicycle"
    seg = ds[0]["seg"]
    assert seg[0, 0] == 255 and seg[5, 5] == 18
    bad = tmp_path / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png"
    _png(bad, np.full((16, 32), 19, np.uint8))
    with pytest.raises(UserError, match=f"{bad} has value 19 outside 0..18"):
        ds[0]
    (tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png").unlink()
    with pytest.raises(UserError, match="empty split folder"):
        build_dataset(f"cityscapes:{tmp_path}", "train", task="seg", crop=16)


def test_folder_layouts(tmp_path):
    flat = tmp_path / "flat"
    for i in range(12):
        _png(flat / "images" / f"a{i:02d}.png", _rgb(20, 20, i))
        _png(flat / "masks" / f"a{i:02d}.png", np.full((20, 20), i % 4, np.uint8))
    train = build_dataset(f"folder:{flat}", "train", task="seg", crop=20)
    val = build_dataset(f"folder:{flat}", "val", task="seg", crop=20)
    assert (len(train), len(val), train.num_classes) == (10, 2, 4)  # a00, a10 are val; classes 0..3
    assert val[1]["seg"][0, 0].item() == 10 % 4
    split = tmp_path / "split"
    for s in ("train", "val"):
        _png(split / "images" / s / "x.png", _rgb(20, 20))
        _png(split / "masks" / s / "x.png", np.full((20, 20), 1, np.uint8))
    (split / "classes.txt").write_text("sky\nroad\ncar\n")
    ds = build_dataset(f"folder:{split}", "val", task="seg", crop=20)
    assert (len(ds), ds.num_classes, ds.class_names) == (1, 3, ["sky", "road", "car"])
    bad = split / "masks" / "val" / "x.png"
    _png(bad, np.full((20, 20), 3, np.uint8))
    with pytest.raises(UserError, match=f"{bad} has value 3 outside 0..2"):
        ds[0]
    _png(bad, _rgb(20, 20))
    with pytest.raises(UserError, match=f"label map {bad} has mode RGB"):
        ds[0]
    (split / "images" / "train" / "x.png").unlink()
    with pytest.raises(UserError, match="empty split folder .*train"):
        build_dataset(f"folder:{split}", "train", task="seg", crop=20)


# ------------------------------------------------------------------ COCO
def _coco(tmp_path):
    from pycocotools import mask as mask_utils

    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "imgs" / name, _rgb(40, 60))
    rle_mask = np.zeros((40, 60), np.uint8, order="F")
    rle_mask[10:20, 30:50] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    rle["counts"] = rle["counts"].decode()
    crowd_mask = np.zeros((40, 60), np.uint8)
    crowd_mask[30:35, 0:10] = 1
    crowd = mask_utils.encode(np.asfortranarray(crowd_mask))
    crowd["counts"] = crowd["counts"].decode()
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 2, "file_name": "b.png", "height": 40, "width": 60},
            {"id": 3, "file_name": "c.png", "height": 40, "width": 60},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "iscrowd": 0,
                "area": 100.0,
                "bbox": [5, 5, 10, 10],
                "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 0,
                "area": 200.0,
                "bbox": [30, 10, 20, 10],
                "segmentation": rle,
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 1,
                "area": 50.0,
                "bbox": [0, 30, 10, 5],
                "segmentation": crowd,
            },
            {
                "id": 4,
                "image_id": 2,
                "category_id": 3,
                "iscrowd": 1,
                "area": 50.0,
                "bbox": [0, 30, 10, 5],
                "segmentation": rle,
            },
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return f"coco:{ann}:{tmp_path / 'imgs'}"


def test_coco_boxes_labels_masks(tmp_path):
    spec = _coco(tmp_path)
    val = build_dataset(spec, "val", task="det", crop=40)
    train = build_dataset(spec, "train", task="det", crop=40)
    assert (len(val), len(train)) == (3, 1)  # train drops images without usable (non-crowd) annotations
    assert val.num_classes == 2 and val.class_names == ["dog", "cat"] and val.has_masks
    it = val[0]  # 60x40 fits scale (160, 40): no resize
    assert it["labels"].tolist() == [2, 1]  # cat (id 7) -> 2, dog (id 3) -> 1; crowd skipped
    assert it["boxes"].tolist() == [[5, 5, 15, 15], [30, 10, 50, 20]]
    assert it["masks"][1].sum().item() == 200 and it["masks"][1][15, 40] == 1
    assert 90 <= it["masks"][0].sum().item() <= 130  # polygon 10x10 (rasterised with its edges)
    assert len(val[1]["labels"]) == 0 and val[1]["masks"].shape == (0, 40, 60)
    seg = build_dataset(spec, "val", task="seg", crop=40)
    s = seg[0]["seg"]
    assert seg.num_classes == 3 and s[15, 40] == 1 and s[10, 10] == 2 and s[0, 0] == 0 and s[32, 5] == 255
    for i in range(4):  # augmented boxes contain their masks
        a = train.get(0, epoch=i)
        for box, mask in zip(a["boxes"], a["masks"].bool()):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= box[0] - 1 and xs.max() < box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() < box[3] + 1


def test_coco_errors(tmp_path):
    spec = _coco(tmp_path)
    (tmp_path / "imgs" / "a.png").unlink()
    with pytest.raises(UserError, match="image file not found: .*a.png"):
        build_dataset(spec, "val", task="det", crop=40)[0]
    with pytest.raises(UserError, match="COCO annotation file not found: .*missing.json"):
        build_dataset(f"coco:{tmp_path / 'missing.json'}:{tmp_path}", "val", task="det", crop=40)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="cannot read COCO annotation file .*bad.json"):
        build_dataset(f"coco:{tmp_path / 'bad.json'}:{tmp_path}", "val", task="det", crop=40)
