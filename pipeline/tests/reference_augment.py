#!/usr/bin/env python3
"""Reference outputs of torchvision's PIL transforms, for tests/augment_vs_torchvision.rs.

Usage: reference_augment.py OUT_DIR

Generates a few RGB images (saved as PNG, so no JPEG decoder enters the comparison, and as
raw HWC bytes for the Rust side), then computes, with torchvision on the PIL images:

* rrc:  F.resized_crop(img, i, j, h, w, size, BILINEAR) (+ F.hflip), ToTensor, Normalize
        for crops from RandomResizedCrop.get_params plus hand-picked edge cases;
* eval: Resize(256) + CenterCrop(224), ToTensor, Normalize.

Each case is written as `<name>.f32` (normalised CHW float32, little-endian) and
`<name>.u8` (the PIL image before ToTensor, HWC uint8); `manifest.json` lists the images
and cases with their parameters.
"""

import json
import os
import sys

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def make_image(width, height, seed):
    """Smooth gradients, hard-edged blocks and noise: every frequency the filter sees."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.empty((height, width, 3), np.float64)
    img[..., 0] = 255 * x / width
    img[..., 1] = 127.5 + 100 * np.sin(x / 9.0) * np.cos(y / 13.0)
    img[..., 2] = 255 * y / height
    blocks = ((x // 17 + y // 11) % 2 == 0)[..., None]
    img = np.where(blocks, img * 0.6, img * 0.6 + 100)
    img += rng.normal(0, 25, img.shape)
    # A few saturated patches so clamping at 0 and 255 is exercised.
    img[height // 3 : height // 3 + 20, width // 4 : width // 4 + 30] = 255
    img[height // 2 : height // 2 + 15, width // 2 : width // 2 + 25] = 0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_normalized(pil):
    t = F.to_tensor(pil)
    return F.normalize(t, MEAN, STD)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)

    # Landscape, portrait, larger, smaller than the output, taller than twice its width
    # (Pillow >= 13 resizes that vertically first in the eval transform), and large
    # enough for filters wider than 8 taps.
    sizes = [(500, 375), (375, 500), (640, 427), (200, 150), (300, 700), (1600, 1200)]
    images, cases = [], []
    for idx, (w, h) in enumerate(sizes):
        arr = make_image(w, h, seed=idx)
        name = f"img{idx}"
        Image.fromarray(arr).save(os.path.join(out_dir, f"{name}.png"))
        arr.tofile(os.path.join(out_dir, f"{name}.rgb"))
        images.append({"name": name, "width": w, "height": h, "rgb": f"{name}.rgb"})
        pil = Image.open(os.path.join(out_dir, f"{name}.png")).convert("RGB")
        assert np.array_equal(np.asarray(pil), arr)

        # (top, left, height, width, flip, out_h, out_w)
        crops = []
        for k in range(8):
            i, j, ch, cw = T.RandomResizedCrop.get_params(pil, (0.08, 1.0), (3 / 4, 4 / 3))
            crops.append((i, j, ch, cw, k % 2 == 1, 224, 224))
        crops += [
            (0, 0, h, w, False, 224, 224),  # whole image, anisotropic
            (h - 31, w - 29, 31, 29, True, 224, 224),  # tiny corner crop: upscaling
            (3, w - 140, 137, 140, False, 160, 192),  # right edge, non-square output
        ]
        for n, (i, j, ch, cw, flip, oh, ow) in enumerate(crops):
            out = F.resized_crop(pil, i, j, ch, cw, [oh, ow], InterpolationMode.BILINEAR)
            if flip:
                out = F.hflip(out)
            cases.append(write_case(out_dir, f"{name}_rrc{n}", "rrc", idx, out,
                                    top=i, left=j, height=ch, width=cw, flip=flip))

        eval_tf = T.Compose([T.Resize(256, InterpolationMode.BILINEAR), T.CenterCrop(224)])
        out = eval_tf(pil)
        cases.append(write_case(out_dir, f"{name}_eval", "eval", idx, out,
                                resize=256, crop=224, flip=False))

    manifest = {
        "pillow": PIL.__version__,
        "torchvision": torchvision.__version__,
        "mean": MEAN,
        "std": STD,
        "images": images,
        "cases": cases,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(cases)} cases for {len(images)} images to {out_dir}")


def write_case(out_dir, name, path, image, out, **params):
    u8 = np.asarray(out, dtype=np.uint8)
    u8.tofile(os.path.join(out_dir, f"{name}.u8"))
    f32 = to_normalized(out).numpy().astype("<f4")
    f32.tofile(os.path.join(out_dir, f"{name}.f32"))
    return {
        "name": name,
        "path": path,
        "image": image,
        "out_height": out.height,
        "out_width": out.width,
        "u8": f"{name}.u8",
        "f32": f"{name}.f32",
        **params,
    }


if __name__ == "__main__":
    main()
