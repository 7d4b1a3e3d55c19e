import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from models.data.coco import CategoryMap, CocoAnnotations, load_image
from models.data.dataset import (
    CocoDataset,
    ImageFolderDataset,
    aspect_grouped_batches,
    collate,
    make_loader,
)
from models.data.demo import write_voc_demo
from models.data.masks import encode_rle, segmentation_to_mask
from models.data.transforms import (
    TransformConfig,
    preprocess_image,
    resize_mask,
    resized_shape,
)
from models.errors import ConfigError, DataError


def _coco(cats=((3, "cat"), (17, "dog"), (1000, "yak")), crowd=False):
    """One 40x60 image (id 7, a.jpg) with a polygon 'dog', an RLE 'yak' and optionally an RLE crowd 'cat'."""
    m = np.zeros((40, 60), np.uint8)
    m[5:20, 10:40] = 1
    anns = [
        {"id": 1, "image_id": 7, "category_id": 17, "segmentation": [[10, 5, 40, 5, 40, 20, 10, 20]], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1000, "segmentation": encode_rle(m), "iscrowd": 0},
    ]
    if crowd:
        anns.append({"id": 3, "image_id": 7, "category_id": 3, "segmentation": encode_rle(m), "iscrowd": 1})
    return {"images": [{"id": 7, "file_name": "a.jpg", "height": 40, "width": 60}],
            "annotations": anns, "categories": [{"id": i, "name": n} for i, n in cats]}


def _with_ann(c, **changes):
    return {**c, "annotations": [{**c["annotations"][0], **changes}] + c["annotations"][1:]}


def _photo_coco(tmp_path, names=("astronaut", "coffee", "chelsea")):
    """scikit-image sample photos of different sizes, each with one box-shaped RLE instance."""
    from skimage import data as skdata

    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i, name in enumerate(names):
        arr = getattr(skdata, name)()
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
        h, w = arr.shape[:2]
        m = np.zeros((h, w), np.uint8)
        m[h // 4: h // 2, w // 4: w // 2] = 1
        coco["images"].append({"id": i, "file_name": f"{name}.png", "height": h, "width": w})
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 1, "segmentation": encode_rle(m),
                                    "iscrowd": 0, "area": int(m.sum())})
    (tmp_path / "a.json").write_text(json.dumps(coco))
    return tmp_path / "a.json", tmp_path


# ---------------------------------------------------------------- categories


def test_category_ids_map_to_contiguous_and_back():
    cm = CategoryMap.from_coco([{"id": 1000, "name": "yak"}, {"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}])
    assert cm.ids == (3, 17, 1000) and cm.names == ("cat", "dog", "yak") and len(cm) == 3
    assert [cm.index_of(i) for i in (3, 17, 1000)] == [0, 1, 2]
    assert [cm.id_of(i) for i in range(3)] == [3, 17, 1000]
    assert CategoryMap.from_coco(cm.to_coco()) == cm
    assert CategoryMap.from_coco(json.loads(json.dumps(cm.to_coco()))) == cm  # survives a checkpoint's JSON
    with pytest.raises(KeyError, match="category id 4"):
        cm.index_of(4)
    with pytest.raises(ValueError, match="duplicate"):
        CategoryMap((1, 1), ("a", "b"))
    assert pickle.loads(pickle.dumps(cm)) == cm and pickle.loads(pickle.dumps(cm)).index_of(1000) == 2


def test_categories_mapped_by_name_to_a_model(write_coco):
    ann_path, images = write_coco(_coco(cats=((5, "dog"), (6, "yak"), (3, "cat"), (9, "unused"))))
    model_cats = CategoryMap((1, 2, 3), ("yak", "cat", "dog"))
    coco = json.loads(ann_path.read_text())
    for a in coco["annotations"]:
        a["category_id"] = {17: 5, 1000: 6}[a["category_id"]]
    ann_path.write_text(json.dumps(coco))
    ann = CocoAnnotations(ann_path, images, categories=model_cats)
    assert ann.categories == model_cats
    s = CocoDataset(ann, TransformConfig(40, 60, flip_prob=0.0), train=True)[0]
    assert s.labels.tolist() == [2, 0]  # dog -> index 2, yak -> index 0
    # The ground truth for COCOeval speaks in the model's ids, like its predictions will.
    assert ann.raw["categories"] == model_cats.to_coco()
    assert [a["category_id"] for a in ann.raw["annotations"]] == [3, 1]
    with pytest.raises(DataError, match="not among the model") as exc:
        CocoAnnotations(ann_path, images, categories=CategoryMap((1,), ("zebra",)))
    assert str(ann_path) in str(exc.value) and "dog" in str(exc.value)


# ---------------------------------------------------------------- loading and validation


def test_raw_gets_the_fields_cocoeval_needs(write_coco):
    c = _coco()
    for a in c["annotations"]:
        a.pop("iscrowd")
    ann_path, images = write_coco(c)
    ann = CocoAnnotations(ann_path, images)
    assert [a["iscrowd"] for a in ann.raw["annotations"]] == [0, 0]
    assert [a["area"] for a in ann.raw["annotations"]] == [450, 450]  # 30x15, the polygon and the RLE box
    assert ann.annotations_for(7) == ann.raw["annotations"] and ann.annotations_for(8) == []
    assert ann.image_path(ann.images[0]) == images / "a.jpg"


BAD = [
    ("not json", lambda c: "{nope", "not valid JSON"),
    ("not a dict", lambda c: [1, 2], "top level must be an object"),
    ("not coco", lambda c: {"hello": 1}, "'images' must be a list"),
    ("annotations not a list", lambda c: {**c, "annotations": {}}, "'annotations' must be a list"),
    ("no images", lambda c: {**c, "images": []}, "'images' is empty"),
    ("ann -> missing image", lambda c: _with_ann(c, image_id=99), "points at image id 99"),
    ("polygon < 3 points", lambda c: _with_ann(c, segmentation=[[1, 2, 3, 4]]), "annotation 1 .*2 points"),
    ("polygon nan", lambda c: _with_ann(c, segmentation=[[0, 0, 10, 0, 10, float("inf")]]), "non-finite"),
    ("no segmentation", lambda c: {**c, "annotations": [{k: v for k, v in c["annotations"][0].items()
                                                        if k != "segmentation"}]}, "no 'segmentation'"),
    ("unknown category", lambda c: _with_ann(c, category_id=4), "category_id 4"),
    ("rle size mismatch", lambda c: _with_ann(c, segmentation=encode_rle(np.zeros((5, 5), np.uint8))),
     r"RLE size \[5, 5\] does not match the image size \[40, 60\]"),
    ("rle counts corrupt", lambda c: _with_ann(c, segmentation={"size": [40, 60], "counts": "03"}), "sum to 3"),
    ("uncompressed rle short", lambda c: _with_ann(c, segmentation={"size": [40, 60], "counts": [100, 20]}),
     "sum to 120"),
    ("duplicate category", lambda c: {**c, "categories": c["categories"] + [{"id": 3, "name": "again"}]},
     "category id 3 appears twice"),
    ("duplicate category name", lambda c: {**c, "categories": c["categories"] + [{"id": 4, "name": "dog"}]},
     "category name 'dog' is used by ids 17 and 4"),
    ("category without name", lambda c: {**c, "categories": [{"id": 3}]}, "needs an integer 'id' and a string"),
    ("duplicate image", lambda c: {**c, "images": c["images"] * 2}, "image id 7 appears twice"),
    ("image without file_name", lambda c: {**c, "images": [{"id": 7, "height": 40, "width": 60}]},
     "needs 'id', 'file_name', 'height' and 'width'"),
    ("image bad height", lambda c: {**c, "images": [{**c["images"][0], "height": -4}]}, "positive integers"),
    ("duplicate annotation id", lambda c: _with_ann(c, id=2), "annotation id 2 appears twice"),
    ("annotation without id", lambda c: {**c, "annotations": [{k: v for k, v in c["annotations"][0].items()
                                                               if k != "id"}]}, "entry #0 needs an integer 'id'"),
    ("bad iscrowd", lambda c: _with_ann(c, iscrowd=2), "'iscrowd' must be 0 or 1"),
    ("bad area", lambda c: _with_ann(c, area="big"), "'area' must be a non-negative number"),
]


@pytest.mark.parametrize("name,mutate,message", BAD, ids=[b[0] for b in BAD])
def test_bad_annotations_raise_data_error_naming_the_file(write_coco, name, mutate, message):
    ann_path, images = write_coco(_coco())
    bad = mutate(_coco())
    ann_path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(DataError, match=message) as exc:
        CocoAnnotations(ann_path, images)
    assert str(ann_path) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_files_and_folders(write_coco, tmp_path):
    ann_path, images = write_coco(_coco(), make_images=False)
    with pytest.raises(DataError, match=r"1 of 1 image files not found under .*: a\.jpg") as exc:
        CocoAnnotations(ann_path, images)
    assert str(ann_path) in str(exc.value)
    with pytest.raises(DataError, match="annotation file not found"):
        CocoAnnotations(tmp_path / "nope.json", images)
    with pytest.raises(DataError, match="image folder not found"):
        CocoAnnotations(ann_path, tmp_path / "no_such_dir")


def test_undecodable_and_missing_images(write_coco, tmp_path):
    ann_path, images = write_coco(_coco(), make_images=False)
    (images / "a.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    ann = CocoAnnotations(ann_path, images)  # existence is checked at load, decoding when read
    with pytest.raises(DataError, match="a.jpg: cannot decode image"):
        CocoDataset(ann, TransformConfig(), train=True)[0]
    with pytest.raises(DataError, match="nope.png: image file not found"):
        load_image(tmp_path / "nope.png")


def test_truncated_jpeg_is_a_data_error(tmp_path):
    from skimage import data as skdata

    path = tmp_path / "cut.jpg"
    Image.fromarray(skdata.coffee()).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="cut.jpg: cannot decode image"):
        load_image(path)


def test_image_size_must_match_the_json(write_coco):
    c = _coco()
    c["images"][0].update(height=60, width=40)  # swapped: as if the file were rotated
    ann_path, images = write_coco(c)
    Image.new("RGB", (60, 40)).save(images / "a.jpg")
    c["annotations"] = c["annotations"][:1]
    ann_path.write_text(json.dumps(c))
    ann = CocoAnnotations(ann_path, images)
    with pytest.raises(DataError, match=r"a\.jpg: image is 40x60 .*EXIF.* but ann\.json says 60x40"):
        CocoDataset(ann, TransformConfig(), train=False)[0]


def test_load_image_applies_exif_orientation_and_converts_to_rgb(tmp_path):
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:, :10] = 255  # white band on the left
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif)
    out = load_image(tmp_path / "r.jpg")
    assert out.mode == "RGB" and out.size == (20, 30)  # (w, h): now portrait
    assert np.asarray(out)[:5].mean() > 200 and np.asarray(out)[-5:].mean() < 50  # band now on top
    Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)).save(tmp_path / "g16.png")
    g = load_image(tmp_path / "g16.png")
    assert g.mode == "RGB" and 0 < np.asarray(g).mean() < 255  # 16-bit grey is scaled, not clipped white


# ---------------------------------------------------------------- transforms and samples


def test_transform_config_is_validated():
    with pytest.raises(ConfigError, match="flip_prob"):
        TransformConfig(flip_prob=1.5)
    with pytest.raises(ConfigError, match="short_side"):
        TransformConfig(short_side=0)


def test_dataset_labels_masks_and_crowd(write_coco):
    ann_path, images = write_coco(_coco(crowd=True))
    ann = CocoAnnotations(ann_path, images)
    s = CocoDataset(ann, TransformConfig(short_side=80, max_long_side=200, flip_prob=0.0), train=True)[0]
    assert s.labels.tolist() == [1, 2]  # crowd (cat) dropped in training; dog=1, yak=2
    assert s.input_size == (80, 120) and s.masks.shape == (2, 80, 120) and s.masks.dtype == torch.uint8
    assert s.image.shape == (3, 80, 120) and s.image.dtype == torch.float32
    assert s.orig_size == (40, 60) and s.image_id == 7 and s.file_name == "a.jpg"
    assert torch.allclose(s.boxes[1], torch.tensor([20.0, 10.0, 80.0, 40.0]))
    assert s.labels.dtype == torch.int64 and s.boxes.dtype == torch.float32
    ev = CocoDataset(ann, TransformConfig(short_side=80, max_long_side=200), train=False)[0]
    assert ev.labels.tolist() == [1, 2, 0]  # evaluation keeps crowd regions, flagged
    assert ev.iscrowd.tolist() == [False, False, True]


def test_crowd_only_images_are_skipped_in_training(write_coco):
    c = _coco(crowd=True)
    c["images"].append({"id": 8, "file_name": "b.jpg", "height": 40, "width": 60})
    c["annotations"].append({**c["annotations"][2], "id": 4, "image_id": 8})  # b.jpg: only a crowd region
    c["images"].append({"id": 9, "file_name": "c.jpg", "height": 40, "width": 60})  # no annotations
    ann_path, images = write_coco(c)
    ann = CocoAnnotations(ann_path, images)
    t = TransformConfig(40, 60)
    assert [im["id"] for im in CocoDataset(ann, t, train=True).images] == [7]
    assert [im["id"] for im in CocoDataset(ann, t, train=True, skip_empty=False).images] == [7, 8, 9]
    assert [im["id"] for im in CocoDataset(ann, t, train=False).images] == [7, 8, 9]
    empty = CocoDataset(ann, t, train=True, skip_empty=False)[2]
    assert empty.masks.shape == (0, 40, 60) and empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    c["annotations"] = [c["annotations"][3]]
    ann_path.write_text(json.dumps(c))
    with pytest.raises(DataError, match="no image has a non-crowd annotation"):
        CocoDataset(CocoAnnotations(ann_path, images), t, train=True)


def test_masks_that_vanish_in_the_resize_are_dropped(write_coco):
    c = _coco()
    c["annotations"][0]["segmentation"] = [[30, 30, 30.4, 30, 30.4, 30.4]]  # sub-pixel speck
    ann_path, images = write_coco(c)
    s = CocoDataset(CocoAnnotations(ann_path, images), TransformConfig(20, 30), train=False)[0]
    assert s.labels.tolist() == [2] and s.masks.shape[0] == 1


def test_resize_mask_keeps_coverage():
    m = np.zeros((400, 600), np.uint8)
    m[100:200, 150:450] = 1
    small = resize_mask(m, (40, 60))
    assert small.dtype == np.uint8 and small.sum() == 10 * 30
    big = resize_mask(small, (400, 600))
    assert (big & m).sum() / (big | m).sum() > 0.99  # bilinear enlarging only rounds the corners
    assert np.array_equal(np.nonzero(big.any(0))[0][[0, -1]], [150, 449])
    thin = np.zeros((400, 600), np.uint8)
    thin[:, 300:306] = 1  # 6 px wide: 60% coverage of one column after shrinking 10x
    assert resize_mask(thin, (40, 60)).sum() == 40


def test_flip_moves_masks_and_boxes_with_the_image(write_coco):
    ann_path, images = write_coco(_coco())
    ann = CocoAnnotations(ann_path, images)
    a = CocoDataset(ann, TransformConfig(40, 60, flip_prob=0.0), train=True)[0]
    b = CocoDataset(ann, TransformConfig(40, 60, flip_prob=1.0), train=True)[0]
    assert torch.equal(b.image, a.image.flip(-1)) and torch.equal(b.masks, a.masks.flip(-1))
    w = a.input_size[1]
    assert torch.allclose(b.boxes[:, [0, 2]], w - a.boxes[:, [2, 0]])
    assert torch.equal(b.boxes[:, [1, 3]], a.boxes[:, [1, 3]])
    never = CocoDataset(ann, TransformConfig(40, 60, flip_prob=1.0), train=False)[0]  # no flip at evaluation
    assert torch.equal(never.masks, a.masks)


def test_voc_demo_dataset(voc_coco, tmp_path):
    ann = CocoAnnotations(*voc_coco)
    assert ann.categories.names == ("bottle", "chair", "diningtable", "person")
    assert ann.categories.ids == (5, 9, 11, 15)
    s = CocoDataset(ann, TransformConfig(375, 500, flip_prob=0.0), train=True)[0]
    assert s.input_size == (375, 500) and len(s.labels) == 19
    assert sorted(set(s.labels.tolist())) == [0, 1, 2, 3]
    raw = json.loads(voc_coco[0].read_text())
    m = segmentation_to_mask(raw["annotations"][0]["segmentation"], 375, 500)
    assert m.sum() == raw["annotations"][0]["area"] > 0
    ann3, images3 = write_voc_demo(tmp_path / "v3", copies=3)
    a3 = CocoAnnotations(ann3, images3)
    assert [(im["height"], im["width"]) for im in a3.images] == [(375, 500), (375, 500), (281, 375)]
    flipped = CocoDataset(a3, TransformConfig(96, 128), train=False)
    assert torch.equal(flipped[1].masks, flipped[0].masks.flip(-1))


# ---------------------------------------------------------------- batching


def test_resize_keeps_aspect_and_collate_pads_to_32(tmp_path):
    t = TransformConfig(short_side=100, max_long_side=150)
    assert resized_shape(512, 512, t) == (100, 100)
    assert resized_shape(400, 600, t) == (100, 150)
    assert resized_shape(300, 900, t) == (50, 150)  # long side capped
    assert resized_shape(900, 300, t) == (150, 50)
    ds = CocoDataset(CocoAnnotations(*_photo_coco(tmp_path)), t, train=False)
    sizes = [ds[i].input_size for i in range(3)]
    assert sizes == [(100, 100), (100, 150), (100, 150)]  # 512x512, 400x600, 300x451 (long side capped)
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch.images.shape == (3, 3, 128, 160)  # max (100, 150) rounded up to /32
    for i, tg in enumerate(batch.targets):
        h, w = tg["input_size"]
        assert tg["masks"].shape[-2:] == batch.images.shape[-2:]
        assert tg["masks"][:, h:].sum() == 0 and tg["masks"][:, :, w:].sum() == 0
        assert torch.equal(tg["masks"][:, :h, :w], ds[i].masks)
        assert torch.equal(batch.images[i, :, :h, :w], ds[i].image)
        assert batch.images[i, :, h:].abs().sum() == 0 and batch.images[i, :, :, w:].abs().sum() == 0
        assert tg["labels"].tolist() == [0] and tg["boxes"].shape == (1, 4)
    moved = batch.to("cpu")
    assert moved.images.shape == batch.images.shape and moved.targets[0]["image_id"] == 0
    odd = collate([ds[2]], size_divisor=7)
    assert odd.images.shape[-2] % 7 == 0 and odd.images.shape[-1] % 7 == 0


def test_aspect_grouped_batches_never_mix_orientations():
    landscape = [True, False, True, True, False, False, True]
    gen = torch.Generator().manual_seed(0)
    batches = aspect_grouped_batches(landscape, 2, gen)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len({landscape[i] for i in b}) == 1 for b in batches)


def _order(loader):
    return [t["image_id"] for b in loader for t in b.targets]


def test_loader_is_deterministic_by_seed_and_reshuffles_each_epoch(voc_coco, tmp_path):
    ann_path, images = write_voc_demo(tmp_path / "v", copies=6)
    ds = CocoDataset(CocoAnnotations(ann_path, images), TransformConfig(48, 64, flip_prob=0.0), train=False)
    a, b = make_loader(ds, 2, shuffle=True, seed=3), make_loader(ds, 2, shuffle=True, seed=3)
    first = _order(a)
    assert sorted(first) == [1, 2, 3, 4, 5, 6] and first == _order(b)
    epochs = [first] + [_order(a) for _ in range(5)]
    assert len({tuple(e) for e in epochs}) > 1  # a new order each pass, not one frozen list
    assert _order(make_loader(ds, 2, shuffle=False, seed=0)) == [1, 2, 3, 4, 5, 6]
    assert len(list(make_loader(CocoDataset(CocoAnnotations(*voc_coco), TransformConfig(64, 96), train=False),
                                1, shuffle=True, seed=3))) == 1


def test_image_folder_dataset_matches_the_training_preprocessing(tmp_path):
    ann_path, root = _photo_coco(tmp_path, names=("coffee", "chelsea"))
    t = TransformConfig(64, 96)
    folder = ImageFolderDataset(root, t)
    assert [p.name for p in folder.paths] == ["chelsea.png", "coffee.png"]
    item = folder[1]
    assert item.orig_size == (400, 600) and item.input_size == (64, 96) and item.path.name == "coffee.png"
    coco = CocoDataset(CocoAnnotations(ann_path, root), t, train=False)
    assert torch.equal(item.image, coco[0].image)
    x, size = preprocess_image(load_image(root / "coffee.png"), t)
    assert torch.equal(x, item.image) and size == (64, 96)
    batch = next(iter(make_loader(folder, 2, shuffle=False, seed=0)))
    assert batch.images.shape == (2, 3, 64, 96) and batch.input_sizes == [(64, 96), (64, 96)]
    assert batch.orig_sizes == [(300, 451), (400, 600)]
    assert ImageFolderDataset(root / "coffee.png", t).paths == [root / "coffee.png"]
    with pytest.raises(DataError, match="missing.jpg: image file not found"):
        ImageFolderDataset([root / "coffee.png", root / "missing.jpg"], t)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        ImageFolderDataset(tmp_path / "empty", t)


def test_scale_jitter_photometric_and_copy_paste(voc_coco):
    """Training augmentations: sizes within the jitter range, masks aligned with pasted pixels, labels kept."""
    import random

    ann = CocoAnnotations(*voc_coco)
    t = TransformConfig(96, 128, scale_range=(0.5, 1.5), photometric=0.3, copy_paste=1.0)
    ds = CocoDataset(ann, t, train=True)
    # one image only: copy-paste needs a second one, so pair the image with a flipped copy of itself
    ds.images = ds.images * 2
    sizes = set()
    for seed in range(6):
        random.seed(seed)
        s = ds[0]
        sizes.add(s.image.shape[-1])
        assert s.image.shape[-2:] == s.masks.shape[-2:] and len(s.labels) == len(s.masks) == len(s.boxes)
        assert 0.5 * 128 - 1 <= s.image.shape[-1] <= 1.5 * 128 + 1
        assert (s.masks.flatten(1).sum(1) > 0).all()  # every kept instance is still visible
        assert s.masks.sum(0).max() <= 1  # pasted instances occlude what they cover
        assert len(s.labels) >= 1
    assert len(sizes) > 1  # the scale changes from sample to sample


def test_training_crops_hold_an_object_and_evaluation_sees_the_whole_image(voc_coco):
    """crop: training samples are windows of at most crop x crop of the resized image, each with an instance
    whose mask matches the image crop; evaluation is untouched."""
    import random

    ann = CocoAnnotations(*voc_coco)
    full = CocoDataset(ann, TransformConfig(256, 400, flip_prob=0.0), train=True)[0]
    assert full.image.shape[-1] > 96 and full.image.shape[-2] > 96
    ds = CocoDataset(ann, TransformConfig(256, 400, flip_prob=0.0, crop=96), train=True)
    corners = set()
    for seed in range(8):
        random.seed(seed)
        s = ds[0]
        assert s.image.shape[-2:] == (96, 96) == s.masks.shape[-2:]
        assert len(s.labels) >= 1 and (s.masks.flatten(1).sum(1) > 0).all()
        # the window is a piece of the full sample: find it and check pixels and masks line up
        hits = [(y, x) for y in range(full.image.shape[-2] - 95) for x in range(full.image.shape[-1] - 95)
                if torch.equal(full.image[:, y:y + 96, x:x + 96], s.image)]
        assert hits, "the crop is not a window of the resized image"
        y, x = hits[0]
        corners.add((y, x))
        window = full.masks[:, y:y + 96, x:x + 96]
        assert sorted(m.sum().item() for m in window if m.any()) == sorted(m.sum().item() for m in s.masks)
    assert len(corners) > 1  # the window moves from sample to sample
    ev = CocoDataset(ann, TransformConfig(256, 400, flip_prob=0.0, crop=96), train=False)[0]
    assert ev.image.shape[-2:] == full.image.shape[-2:]  # evaluation: the whole image
    with pytest.raises(ConfigError, match="crop"):
        TransformConfig(crop=8)


def test_crop_window_stays_inside_and_holds_an_instance():
    import random

    from models.data.transforms import crop_window

    rng = random.Random(0)
    m = np.zeros((300, 500), np.uint8)
    m[280:290, 480:495] = 1  # one small object in a corner
    for _ in range(50):
        y0, x0, h, w = crop_window(300, 500, 128, [np.zeros_like(m), m], rng)
        assert (h, w) == (128, 128) and 0 <= y0 <= 300 - 128 and 0 <= x0 <= 500 - 128
        assert m[y0:y0 + h, x0:x0 + w].any()
    assert crop_window(100, 500, 128, [], rng)[2:] == (100, 128)  # a side below the crop stays whole


def test_copy_paste_never_fills_an_image_past_the_fullest_of_the_set(write_coco):
    """The kernels follow the fullest training image (3 instances here): pasting the 3 instances of b.jpg onto
    the 1 of a.jpg (apart, so nothing is occluded) stops at 3 instances, where it would make 4."""
    import random

    def box(y0: int, x0: int) -> list[list[int]]:
        return [[x0, y0, x0 + 8, y0, x0 + 8, y0 + 8, x0, y0 + 8]]

    c = {"images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 60},
                    {"id": 2, "file_name": "b.jpg", "height": 40, "width": 60}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": box(2, 2), "iscrowd": 0}]
         + [{"id": 2 + k, "image_id": 2, "category_id": 1, "segmentation": box(25, 10 + 15 * k), "iscrowd": 0}
            for k in range(3)],
         "categories": [{"id": 1, "name": "thing"}]}
    ann = CocoAnnotations(*write_coco(c))
    ds = CocoDataset(ann, TransformConfig(40, 60, flip_prob=0.0, copy_paste=1.0), train=True)
    assert ds.max_instances == 3
    counts = set()
    for seed in range(12):
        random.seed(seed)
        counts.add(len(ds[0].labels))
    assert counts <= {2, 3} and 3 in counts  # pasted (1 + 1 or 1 + 2), never 1 + 3
    ds.max_instances = 4
    for seed in range(30):
        random.seed(seed)
        counts.add(len(ds[0].labels))
    assert 4 in counts  # with room, all three go


def test_paste_instances_occludes_and_drops():
    from models.data.transforms import paste_instances

    x = torch.zeros(3, 10, 10)
    masks = torch.zeros(2, 10, 10, dtype=torch.uint8)
    masks[0, :5, :5] = 1  # fully covered by the paste below: dropped
    masks[1, 6:, 6:] = 1  # untouched
    src = torch.ones(3, 8, 8)
    src_masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    src_masks[0, :6, :6] = 1
    out, kept, keep = paste_instances(x, masks, src, src_masks)
    assert keep.tolist() == [False, True, True]
    assert torch.equal(kept[0], masks[1]) and kept[1][:6, :6].all()
    assert (out[:, :6, :6] == 1).all() and (out[:, 6:, 6:] == 0).all()


def test_decoded_images_are_cached_and_match_uncached(voc_coco, tmp_path):
    """The in-memory cache gives the same samples as decoding each time, and spares the disk."""
    import shutil

    ann_file, images = voc_coco
    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    ann = CocoAnnotations(ann_file, copy)
    t = TransformConfig(96, 128, flip_prob=0.0)
    cached, fresh = CocoDataset(ann, t, train=False), CocoDataset(ann, t, train=False, cache_mb=0)
    a, b = cached[0], fresh[0]
    assert torch.equal(a.image, b.image) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    assert fresh._cache == {} and cached._cache_bytes > 0
    for f in copy.iterdir():
        f.unlink()
    again = cached[0]  # from memory: the file is gone
    assert torch.equal(again.image, a.image) and torch.equal(again.masks, a.masks)
    with pytest.raises(DataError, match="not found"):
        fresh[0]
    # training: cached once at the largest jittered size, every sample resized from it
    train = CocoDataset(CocoAnnotations(*voc_coco), TransformConfig(96, 128, scale_range=(0.5, 1.5)), train=True)
    first = train[0]
    assert next(iter(train._cache.values())).image.size == (192, 144)  # 1.5 x (128, 96)
    assert len(first.labels) == len(first.masks) and (first.masks.flatten(1).sum(1) > 0).all()
