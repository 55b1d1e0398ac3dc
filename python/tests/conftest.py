"""Tiny datasets the tests make themselves: JPEGs written with PIL, packed with
convnets.pack_imagenet; and the Rust loader's batches for comparison, written by the root
workspace's `loader_batches` example."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import convnets

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["n01440764", "n01443537", "n01484850"]


def write_imagenet(root, per_class, image, val_per_class=2):
    """root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG; `image(i)` makes image number i
    (numbered over the whole folder, train first)."""
    i = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for wnid in CLASSES:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for k in range(count):
                image(i).save(folder / f"{wnid}_{k}.JPEG", quality=92)
                i += 1


def textured(i):
    """Noise over a gradient, of varied sizes and aspect ratios, so that crops and
    resampling show in every pixel."""
    rng = np.random.default_rng(i)
    w, h = 40 + 7 * (i % 5), 30 + 9 * (i % 4)
    grad = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 55, h)[:, None, None]
    px = grad + rng.integers(0, 40, (h, w, 3))
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))


def solid_color(i):
    """One flat colour per image, so that a sample names its record whatever the crop."""
    return Image.new("RGB", (48 + 4 * (i % 3), 40), color_of(i))


def color_of(i):
    return (8 * (i % 32) + 4, 8 * (i // 32) + 4, 128)


def index_of_pixel(rgb):
    """The image number whose `color_of` is nearest to `rgb` (a uint8 HWC centre pixel)."""
    r, g = (int(v) for v in rgb[:2])
    return round((r - 4) / 8) + 32 * round((g - 4) / 8)


@pytest.fixture(scope="session")
def textured_dataset(tmp_path_factory):
    """36 train (12 per class) and 6 val images of varied sizes, packed into 3 train shards."""
    tmp = tmp_path_factory.mktemp("textured")
    write_imagenet(tmp / "imagenet", 12, textured)
    out = tmp / "packed"
    report = convnets.pack_imagenet(tmp / "imagenet", out, train_shards=3, val_shards=1, threads=2)
    assert report["splits"]["train"]["records"] == 36, report
    return out


@pytest.fixture(scope="session")
def solid_dataset(tmp_path_factory):
    """24 train and 9 val flat-coloured images: each sample identifies its record."""
    tmp = tmp_path_factory.mktemp("solid")
    write_imagenet(tmp / "imagenet", 8, solid_color, val_per_class=3)
    out = tmp / "packed"
    convnets.pack_imagenet(tmp / "imagenet", out, train_shards=2, val_shards=1, threads=2)
    return out


def rust_batches(dataset, out, **options):
    """The Rust loader's batches for `dataset` and `options` (keys of the example's
    key=value arguments), as {(epoch, index): (images, labels)}."""
    from safetensors.torch import load_file

    args = [f"{k}={v}" for k, v in options.items()]
    run = subprocess.run(
        ["cargo", "run", "--quiet", "--locked", "--example", "loader_batches", "--",
         str(dataset), str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, f"loader_batches {' '.join(args)} failed:\n{run.stdout}{run.stderr}"
    tensors = load_file(str(out))
    batches = {}
    for key in tensors:
        if key.endswith("_images"):
            epoch, index = (int(p[1:]) for p in key.split("_")[:2])
            stem = key[: -len("_images")]
            batches[(epoch, index)] = (tensors[key], tensors[stem + "_labels"])
    return batches


def shard_files(dataset, split):
    manifest = json.loads((Path(dataset) / "manifest.json").read_text())
    return [shard["file"] for shard in manifest["splits"][split]["shards"]]
