"""PyTorch training-step throughput on synthetic GPU data, for side-by-side runs with
`convnets bench train`: same models, batch sizes, fp16 autocast, channels_last, SGD with
the seed's momentum and weight decay (foreach), cudnn.benchmark.

usage: torch_train_throughput.py [--compile] [--steps N] [ARCH ...]
       (default archs: resnet50 resnext101_32x4d seresnext101_32x4d)
Prints one JSON line per (arch, variant): eager with and without GradScaler, or with
--compile `torch.compile` (default mode) + GradScaler, with its warm-up (compile) time.
"""
import argparse, json, time
import torch, torch.nn as nn, torchvision

BATCH = {"resnet50": 256, "resnext101_32x4d": 128, "seresnext101_32x4d": 128}


def build(name):
    if name.startswith("resnet"):
        return getattr(torchvision.models, name)()
    import timm
    return timm.create_model(name)


def measure(name, scaler_on, compiled, warm=10, steps=30):
    torch.backends.cudnn.benchmark = True
    model = build(name).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875, weight_decay=3.0517578125e-05, foreach=True)
    scaler = torch.amp.GradScaler(enabled=scaler_on)
    fwd = torch.compile(model) if compiled else model
    bs = BATCH.get(name, 256)
    x = torch.randn(bs, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (bs,), device="cuda")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(fwd(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    t0 = time.time()
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    t = time.time()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return bs * steps / (time.time() - t), warm_s


p = argparse.ArgumentParser()
p.add_argument("--compile", action="store_true")
p.add_argument("--steps", type=int, default=30)
p.add_argument("archs", nargs="*")
a = p.parse_args()
variants = [(True, True)] if a.compile else [(True, False), (False, False)]
for name in a.archs or list(BATCH):
    for scaler_on, compiled in variants:
        img_s, warm_s = measure(name, scaler_on, compiled, steps=a.steps)
        print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "arch": name,
                          "batch": BATCH.get(name, 256), "amp": True, "grad_scaler": scaler_on,
                          "compile": "default" if compiled else None, "channels_last": True,
                          "images_per_sec": img_s, "warmup_s": warm_s}), flush=True)
