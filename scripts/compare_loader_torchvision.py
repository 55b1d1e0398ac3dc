"""Side-by-side: torchvision's CPU DataLoader vs `convnets bench loader --loader cpu`,
same images, same machine, same number of cores, one run.

torchvision: ImageFolder + PIL decode + RandomResizedCrop(224) + RandomHorizontalFlip +
ToTensor + Normalize, one worker process per core. convnets: the same transform from the
packed copy of the same images, one decode thread per core, fp32 NCHW output.

usage: compare_loader_torchvision.py IMAGE_FOLDER PACKED_DATASET CONVNETS_BIN
         [--batch-size 256] [--workers N] [--batches 40] [--seconds 20]
IMAGE_FOLDER is the class-folder root (the `train/` of an ImageNet layout).
Prints one JSON document.
"""
import argparse, json, os, platform, subprocess, sys, time


def torchvision_img_s(root, batch_size, workers, batches, warmup):
    import torch, torchvision
    import torchvision.transforms as T
    torch.set_num_threads(1)
    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ds = torchvision.datasets.ImageFolder(
        root, T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    ld = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                     drop_last=True, persistent_workers=True, prefetch_factor=4)
    n, t, i = 0, None, 0
    while True:
        for x, _ in ld:
            if i == warmup:
                t, n = time.time(), 0
            elif i > warmup:
                n += x.shape[0]
            i += 1
            if i > warmup + batches:
                return n / (time.time() - t), len(ds)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("images")
    p.add_argument("packed")
    p.add_argument("convnets")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seconds", type=float, default=20)
    a = p.parse_args()

    tv, n_images = torchvision_img_s(a.images, a.batch_size, a.workers, a.batches, a.warmup)
    out = subprocess.run(
        [a.convnets, "bench", "loader", "--data", a.packed, "--loader", "cpu",
         "--batch-size", str(a.batch_size), "--threads", str(a.workers),
         "--warmup-batches", str(a.warmup), "--seconds", str(a.seconds), "--json"],
        check=True, capture_output=True, text=True).stdout
    ours = json.loads(out)
    import torch, torchvision, PIL
    print(json.dumps({
        "machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine()},
        "images": n_images,
        "batch_size": a.batch_size,
        "workers": a.workers,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__},
        "torchvision_img_s": tv,
        "convnets_img_s": ours["images_per_s"],
        "ratio": ours["images_per_s"] / tv,
        "convnets": ours,
    }, indent=2))


if __name__ == "__main__":
    main()
