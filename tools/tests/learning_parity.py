"""The PyTorch side of tools/tests/learning_parity.rs.

`data OUT SIZE`: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes,
shipped inside the wheel) as JPEG class folders OUT/{train,val}/<digit>/*.JPEG, upscaled
to SIZE x SIZE and grey to RGB; every fifth image (by index) is in val.

`train DATA SIZE BATCH EPOCHS WARMUP ZERO_INIT SEED`: the seed's recipe written
independently with torchvision and torch.optim (resnet18, SGD momentum 0.875 with weight
decay 3.0517578125e-05 on conv/linear weights only, LR 0.256 per 256 images with a linear
warm-up from 0 then cosine to 0 stepped every batch through LambdaLR, label smoothing 0.1,
RandomResizedCrop + flip, Resize(ceil(size * 8 / 7)) + CenterCrop for validation, ImageNet
mean/std). Prints {"top1": ...} for the last epoch's model on val.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_data(out, size):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if i % 5 == 0 else "train"
        folder = Path(out) / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray(np.uint8(np.round(image * (255 / 16))), mode="L")
        rgb = grey.resize((size, size), Image.BICUBIC).convert("RGB")
        rgb.save(folder / f"{i:04}.JPEG", quality=95)


def lr_factor(warmup_steps, total_steps):
    def factor(step):
        if step < warmup_steps:
            return step / warmup_steps
        done = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
        return 0.5 * (1 + math.cos(math.pi * done))

    return factor


def train(data, size, batch, epochs, warmup_epochs, zero_init, seed):
    torch.manual_seed(seed)
    normalize = [T.ToTensor(), T.Normalize(MEAN, STD)]
    train_set = torchvision.datasets.ImageFolder(
        Path(data) / "train",
        T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize]),
    )
    val_set = torchvision.datasets.ImageFolder(
        Path(data) / "val",
        T.Compose([T.Resize(math.ceil(size * 8 / 7)), T.CenterCrop(size), *normalize]),
    )
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch, shuffle=True, drop_last=True
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch)
    model = torchvision.models.resnet18(
        num_classes=len(train_set.classes), zero_init_residual=zero_init
    )
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": 3.0517578125e-05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.256 * batch / 256,
        momentum=0.875,
        nesterov=False,
    )
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(warmup_epochs * steps, epochs * steps)
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    for _ in range(epochs):
        model.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            criterion(model(images), labels).backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    hits = 0
    with torch.no_grad():
        for images, labels in val_loader:
            hits += (model(images).argmax(1) == labels).sum().item()
    print(json.dumps({"top1": hits / len(val_set)}))


if __name__ == "__main__":
    if sys.argv[1] == "data":
        make_data(sys.argv[2], int(sys.argv[3]))
    else:
        a = sys.argv[2:]
        train(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]), a[5] == "true", int(a[6]))
