"""Reference for tools/tests/sgd_vs_torch.rs: torch.optim.SGD with the seed's parameter
groups (weight decay on conv/linear weights only, none on BN parameters and biases),
stepped with the gradients and learning rates the Rust test used.

usage: sgd_reference.py DIR MOMENTUM WEIGHT_DECAY NESTEROV(0|1)
DIR holds initial.safetensors (the trainable parameters), grads-K.safetensors and
lrs.json (the LR of each step K); writes torch.safetensors (the parameters after).
"""
import json, os, sys

import torch
from safetensors.torch import load_file, save_file

d, momentum, wd, nesterov = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
params = {k: torch.nn.Parameter(v.clone()) for k, v in load_file(os.path.join(d, "initial.safetensors")).items()}
decay = [p for p in params.values() if p.ndim > 1]
no_decay = [p for p in params.values() if p.ndim <= 1]
opt = torch.optim.SGD(
    [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
    lr=0.1, momentum=momentum, nesterov=nesterov)
for k, lr in enumerate(json.load(open(os.path.join(d, "lrs.json")))):
    grads = load_file(os.path.join(d, f"grads-{k}.safetensors"))
    for name, p in params.items():
        p.grad = grads[name].clone()
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
save_file({k: p.detach().contiguous() for k, p in params.items()}, os.path.join(d, "torch.safetensors"))
