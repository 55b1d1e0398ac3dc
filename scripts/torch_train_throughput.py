"""PyTorch eager training-step throughput on synthetic GPU data, for side-by-side runs
with `throughput` (models/examples/throughput.rs): same models, batch sizes, fp16
autocast, channels_last, SGD with momentum, cudnn.benchmark.

usage: torch_train_throughput.py [ARCH ...]   (default: resnet50 resnext101_32x4d seresnext101_32x4d)
Prints one JSON line per (arch, GradScaler on/off).
"""
import json, sys, time
import torch, torch.nn as nn, torchvision

BATCH = {"resnet50": 256, "resnext101_32x4d": 128, "seresnext101_32x4d": 128}


def build(name):
    if name.startswith("resnet"):
        return getattr(torchvision.models, name)()
    import timm
    return timm.create_model(name)


def measure(name, scaler_on, warm=10, steps=30):
    torch.backends.cudnn.benchmark = True
    model = build(name).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(enabled=scaler_on)
    bs = BATCH.get(name, 256)
    x = torch.randn(bs, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (bs,), device="cuda")
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return bs * steps / (time.time() - t)


for name in sys.argv[1:] or list(BATCH):
    for scaler_on in (True, False):
        print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "arch": name,
                          "batch": BATCH.get(name, 256), "amp": True, "grad_scaler": scaler_on,
                          "channels_last": True, "images_per_sec": measure(name, scaler_on)}), flush=True)
