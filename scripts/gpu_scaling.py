#!/usr/bin/env python3
"""Training throughput on 1..N GPUs of one machine: `convnets train --gpus G --amp` per
model, with the GPU loader (ImageNet-like JPEGs, packed) and with `--loader synthetic`.

Runs from dist/gpu (made by scripts/gpu-build). Each run trains --epochs whole epochs; its
figure is the mean img/s of the epochs after the first (all ranks together, each epoch's
wall time including its boundary: checkpoint, loader turn-over), as the seed averages over
whole epochs; the first epoch holds start-up (cuDNN autotuning, NCCL, graph capture) and
is reported apart, as is the longest epoch boundary. `--precisions amp,tf32` adds the
fp32 (TF32 convolutions) runs and the AMP speed-up. Results go to OUT/scaling.json after
every run (so a run cut short still leaves the rows it finished) and the table is printed
as Markdown.

    python3 gpu_scaling.py --gpus 1,2,4,8
    python3 gpu_scaling.py --archs resnet50 --gpus 1,2 --loaders gpu
    python3 gpu_scaling.py --table a/scaling.json b/scaling.json   # merge, print
"""
import argparse, json, os, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHS = ["resnet50", "resnext101_32x4d", "seresnext101_32x4d"]


def visible_gpus():
    import torch
    return torch.cuda.device_count()


def library_path():
    """The binary finds libtorch (and nvJPEG, NVRTC) through LD_LIBRARY_PATH, as in gpu-run."""
    import torch
    dirs = [os.path.join(os.path.dirname(torch.__file__), "lib"), "/usr/local/cuda-13.0/targets/x86_64-linux/lib"]
    os.environ["LD_LIBRARY_PATH"] = ":".join(dirs + [p for p in [os.environ.get("LD_LIBRARY_PATH")] if p])


def dataset(work, convnets, images):
    packed = os.path.join(work, "packed")
    if os.path.exists(os.path.join(packed, "manifest.json")):
        return packed
    inet = os.path.join(work, "inet")
    print(f"== data: {images} ImageNet-like JPEGs, packed", file=sys.stderr)
    subprocess.run([sys.executable, os.path.join(HERE, "gen_imagenet_like.py"), os.path.join(inet, "train"),
                    str(images), "100"], check=True, stdout=sys.stderr)
    subprocess.run([convnets, "pack-imagenet", "-i", inet, "-o", packed, "-q"], check=True)
    return packed


def whole_epochs(log):
    """Per-epoch img/s and boundary seconds from the trainer's `epoch` records."""
    epochs = [json.loads(l) for l in open(log) if '"epoch"' in l]
    epochs = [e for e in epochs if e.get("type") == "epoch"]
    if len(epochs) < 2:
        raise RuntimeError(f"{log}: {len(epochs)} whole epochs; raise --epochs")
    rates = [e["img_s"] for e in epochs]
    return {"img_s": statistics.mean(rates[1:]), "first_epoch_img_s": rates[0],
            "epoch_img_s": [round(r) for r in rates],
            "max_boundary_s": max(e["boundary_s"] for e in epochs[1:])}


def run(a, arch, loader, gpus, precision, data):
    out = os.path.join(a.work, f"{arch}-{loader}-{gpus}-{precision}")
    cmd = [a.convnets, "train", "--arch", arch, "--loader", loader, "--gpus", str(gpus),
           "--batch-size", str(a.batch_size), "--epochs", str(a.epochs),
           "--log-every", str(a.log_every), "--eval-every", "0", "-o", out]
    if precision == "amp":
        cmd.append("--amp")
    if loader != "synthetic":
        cmd += ["--data", data]
    print("== " + " ".join(cmd[1:]), file=sys.stderr)
    subprocess.run(["rm", "-rf", out], check=True)
    started = time.time()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    row = {"arch": arch, "loader": loader, "gpus": gpus, "precision": precision, "batch_per_gpu": a.batch_size,
           "epochs": a.epochs, "wall_s": round(time.time() - started, 1), "command": "convnets " + " ".join(cmd[1:])}
    if p.returncode != 0:
        row["error"] = p.stderr.strip().splitlines()[-5:]
        print("\n".join(row["error"]), file=sys.stderr)
        return row
    row.update(whole_epochs(os.path.join(out, "log.jsonl")))
    return row


def save(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    os.replace(tmp, path)


def table(rows):
    """Markdown: one line per (arch, loader), img/s and scaling efficiency per GPU count."""
    counts = sorted({r["gpus"] for r in rows})
    best = {}
    for r in rows:
        key = (r["arch"], r["loader"] + ("" if r.get("precision", "amp") == "amp" else " " + r["precision"]), r["gpus"])
        if "img_s" in r:
            best[key] = r["img_s"]
        else:
            best.setdefault(key, "failed")
    head = "| arch | loader | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in counts) + " |"
    lines = [head, "|" + "---|" * 2 + "---:|" * len(counts)]
    keys = sorted({k[:2] for k in best}, key=lambda k: (ARCHS.index(k[0]) if k[0] in ARCHS else 9, k[1]))
    for arch, loader in keys:
        one = best.get((arch, loader, 1))
        cells = []
        for g in counts:
            v = best.get((arch, loader, g))
            if v is None or isinstance(v, str):
                cells.append(v or "")
            elif g == 1 or not isinstance(one, (int, float)):
                cells.append(f"{v:,.0f}")
            else:
                cells.append(f"{v:,.0f} ({v / (g * one):.0%})")
        lines.append(f"| {arch} | {loader} | " + " | ".join(cells) + " |")
    speedups = []
    for (arch, loader, g), v in sorted(best.items()):
        tf32 = best.get((arch, loader + " tf32", g))
        if not loader.endswith("tf32") and isinstance(v, float) and isinstance(tf32, float):
            speedups.append(f"{arch} {loader} {g} GPU(s): AMP {v / tf32:.2f}x TF32")
    note = ("\n\nimg/s of all GPUs together, mean over whole epochs after the first (boundaries included); "
            "in brackets, scaling efficiency: img/s(N) / (N x img/s(1)). Rows marked tf32 train in fp32 (TF32 convolutions).")
    return "\n".join(lines) + note + ("\n\n" + "\n".join(speedups) if speedups else "")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts; those above the visible GPUs are skipped")
    p.add_argument("--loaders", default="gpu,synthetic")
    p.add_argument("--batch-size", type=int, default=256, help="per GPU, as in the seed")
    p.add_argument("--epochs", type=int, default=3, help="whole epochs per run (the first is start-up)")
    p.add_argument("--precisions", default="amp", help="amp and/or tf32")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--images", type=int, default=40000, help="ImageNet-like JPEGs to make for the GPU loader")
    p.add_argument("--convnets", default=os.path.join(HERE, "convnets"))
    p.add_argument("--work", default=os.environ.get("WORK", "/tmp/convnets-scaling"))
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "scaling-results")))
    p.add_argument("--table", nargs="+", metavar="JSON", help="only merge these results and print the table")
    a = p.parse_args()
    if a.table:
        rows = [r for f in a.table for r in json.load(open(f))["rows"]]
        print(table(rows))
        return
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    library_path()
    have = visible_gpus()
    counts = [int(g) for g in a.gpus.split(",")]
    skipped = [g for g in counts if g > have]
    if skipped:
        print(f"skipping {skipped} GPUs: {have} visible", file=sys.stderr)
    counts = [g for g in counts if g <= have]
    loaders = a.loaders.split(",")
    data = dataset(a.work, a.convnets, a.images) if any(l != "synthetic" for l in loaders) else None
    rows, path = [], os.path.join(a.out, "scaling.json")
    for arch in a.archs.split(","):
        for precision in a.precisions.split(","):
            for loader in loaders:
                for g in counts:
                    rows.append(run(a, arch, loader, g, precision, data))
                    save(path, rows)
    print(table(rows))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
