#!/usr/bin/env python3
"""Reference data for models/tests/equivalence.rs, from torchvision and timm.

Usage (run with the workspace venv, .venv/bin/python):

  make_reference.py reference OUT_DIR [CASE ...]
      For each case, build the torchvision/timm model with a fixed seed, randomise the BN
      affine parameters and running statistics (so zero-init gammas and unit statistics do
      not make the test trivial), and write
        OUT_DIR/<arch>.safetensors      the state_dict (parameters and buffers), pre-training
        OUT_DIR/<arch>_io.safetensors   input, labels, eval-mode logits, and for one
                                        training-mode forward + backward: logits, loss,
                                        grad.<name> for a few parameters and
                                        after_train.<name> for a few BN buffers.

  make_reference.py check-rust OUT_DIR [CASE ...]
      The other direction: load OUT_DIR/<arch>.rust.safetensors (written by our Rust code)
      into the torchvision/timm model with load_state_dict(strict=True), check names, shapes
      and dtypes, run OUT_DIR/<arch>.rust_io.safetensors' input in eval mode and compare
      with the logits Rust computed. Exits 1 on any difference.

  make_reference.py counts
      Print the parameter count of every architecture (the constants in param_counts.rs).

CASE is arch:num_classes:batch:height:width, e.g. resnet18:10:4:96:128.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
TIMM = ["resnext101_32x4d", "seresnext101_32x4d"]
DEFAULT_CASES = [
    "resnet18:10:4:96:128",
    "resnet50:1000:2:224:224",
    "resnext101_32x4d:1000:2:64:64",
    "seresnext101_32x4d:100:2:64:64",
]
# Logits must agree to this, relative to their largest magnitude (fp32, eval mode).
LOGITS_RTOL = 1e-4
SEED = 20240607


def parse_case(text):
    arch, num_classes, batch, height, width = text.split(":")
    return arch, int(num_classes), int(batch), int(height), int(width)


def build(arch, num_classes):
    # Imported here: each costs seconds, and a torchvision arch needs no timm.
    if arch in TORCHVISION:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if arch in TIMM:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    raise SystemExit(f"unknown arch {arch!r}; known: {', '.join(TORCHVISION + TIMM)}")


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@torch.no_grad()
def randomise(model, gen, height, width):
    """Random BN gammas/betas, then running statistics close to the true ones.

    Statistics are measured on a calibration batch (so eval-mode activations stay well
    scaled through 100 layers), then perturbed so they differ from batch statistics.
    """
    for bn in batch_norms(model):
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(0.0, 0.2, generator=gen)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    model(torch.randn(8, 3, height, width, generator=gen))
    for bn in batch_norms(model):
        bn.momentum = 0.1
        std = bn.running_var.sqrt()
        bn.running_mean.add_(0.2 * std * torch.randn(bn.running_mean.shape, generator=gen))
        bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.4, generator=gen))
        bn.num_batches_tracked.fill_(7)


def last_block(model):
    return len(model.layer4) - 1


def grad_names(model):
    last = last_block(model)
    names = [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "layer1.0.conv1.weight",
        "layer1.0.bn1.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.bias",
        "layer3.1.conv2.weight",
        f"layer4.{last}.conv2.weight",
        f"layer4.{last}.conv3.weight",
        f"layer4.{last}.bn2.bias",
        "layer1.0.se.fc1.weight",
        "layer1.0.se.fc1.bias",
        f"layer4.{last}.se.fc2.weight",
        f"layer4.{last}.se.fc2.bias",
        "fc.weight",
        "fc.bias",
    ]
    params = dict(model.named_parameters())
    return [n for n in names if n in params]


def buffer_names(model):
    last = last_block(model)
    names = [
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer2.0.downsample.1.running_var",
        f"layer4.{last}.bn2.running_mean",
        f"layer4.{last}.bn2.running_var",
        f"layer4.{last}.bn2.num_batches_tracked",
    ]
    buffers = dict(model.named_buffers())
    return [n for n in names if n in buffers]


def reference(out_dir, cases):
    torch.manual_seed(SEED)
    for case in cases:
        arch, num_classes, batch, height, width = parse_case(case)
        gen = torch.Generator().manual_seed(SEED)
        model = build(arch, num_classes)
        randomise(model, gen, height, width)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out_dir / f"{arch}.safetensors"))

        inputs = torch.randn(batch, 3, height, width, generator=gen)
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
        io = {"input": inputs, "labels": labels}
        model.eval()
        with torch.no_grad():
            io["logits_eval"] = model(inputs)

        model.train()
        model.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        io["logits_train"] = logits.detach()
        io["loss_train"] = loss.detach()
        params = dict(model.named_parameters())
        for name in grad_names(model):
            io[f"grad.{name}"] = params[name].grad.detach().clone()
        buffers = dict(model.named_buffers())
        for name in buffer_names(model):
            io[f"after_train.{name}"] = buffers[name].detach().clone()
        save_file({k: v.contiguous() for k, v in io.items()}, str(out_dir / f"{arch}_io.safetensors"))
        scale = io["logits_eval"].abs().max().item()
        print(f"{arch}: {len(state)} tensors, logits max |x| {scale:.3g}, loss {loss.item():.4f}")


def check_rust(out_dir, cases):
    failures = []
    for case in cases:
        arch, num_classes, _, _, _ = parse_case(case)
        with torch.device("meta"):  # no initialisation: every tensor comes from the file
            model = build(arch, num_classes)
        expected = model.state_dict()
        ours = load_file(str(out_dir / f"{arch}.rust.safetensors"))
        missing = sorted(set(expected) - set(ours))
        unexpected = sorted(set(ours) - set(expected))
        if missing or unexpected:
            failures.append(f"{arch}: missing {missing[:10]}, unexpected {unexpected[:10]}")
            continue
        wrong = [
            f"{k}: {tuple(ours[k].shape)} {ours[k].dtype} vs {tuple(v.shape)} {v.dtype}"
            for k, v in expected.items()
            if ours[k].shape != v.shape or ours[k].dtype != v.dtype
        ]
        if wrong:
            failures.append(f"{arch}: shape/dtype differences {wrong[:10]}")
            continue
        model.load_state_dict(ours, strict=True, assign=True)
        io = load_file(str(out_dir / f"{arch}.rust_io.safetensors"))
        model.eval()
        with torch.no_grad():
            logits = model(io["input"])
        rust = io["logits_eval"]
        scale = rust.abs().max().item()
        err = (logits - rust).abs().max().item()
        status = "ok" if err <= LOGITS_RTOL * scale else "MISMATCH"
        print(f"{arch}: {len(ours)} tensors loaded strictly; eval logits max |diff| {err:.3g} "
              f"(max |x| {scale:.3g}) {status}")
        if status != "ok":
            failures.append(f"{arch}: logits differ by {err:.3g} (scale {scale:.3g})")
        counters = {k: int(v) for k, v in ours.items() if k.endswith("num_batches_tracked")}
        if "expected_num_batches_tracked" in io:
            want = int(io["expected_num_batches_tracked"])
            bad = {k: v for k, v in counters.items() if v != want}
            if bad:
                failures.append(f"{arch}: num_batches_tracked != {want}: {list(bad.items())[:5]}")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)


def counts():
    for arch in TORCHVISION + TIMM:
        model = build(arch, 1000)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{arch}: {n_params} parameters, {len(model.state_dict())} state_dict entries")


def main(argv):
    if len(argv) >= 2 and argv[1] == "counts":
        counts()
        return
    if len(argv) < 3 or argv[1] not in ("reference", "check-rust"):
        raise SystemExit(__doc__)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    out_dir = Path(argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = argv[3:] or DEFAULT_CASES
    if argv[1] == "reference":
        reference(out_dir, cases)
    else:
        check_rust(out_dir, cases)


if __name__ == "__main__":
    main(sys.argv)
