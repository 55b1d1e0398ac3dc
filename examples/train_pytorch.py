#!/usr/bin/env python3
"""Trains torchvision's resnet50 with AMP and channels_last, fed by convnets.Loader, and
prints the training throughput over whole epochs as JSON at the end.

    # one GPU
    python examples/train_pytorch.py --data /data/imagenet-packed --epochs 2 --batch-size 256
    # 8 GPUs of one machine (one process per GPU; each gets its share of every epoch)
    torchrun --nproc-per-node 8 examples/train_pytorch.py --data /data/imagenet-packed --epochs 2
    # the same loop on one fixed GPU batch: the model's compute-only speed (no input pipeline)
    python examples/train_pytorch.py --synthetic --data /data/imagenet-packed --epochs 2
    # the same loop fed by NVIDIA DALI (needs nvidia-dali and an ImageNet folder of JPEGs,
    # train/<wnid>/*.JPEG): file reader, nvJPEG mixed decode with random crop, resize, flip,
    # normalize
    python examples/train_pytorch.py --dali --data /data/imagenet --epochs 2

--data is a dataset packed by `convnets pack-imagenet` (or convnets.pack_imagenet), or a
TFRecord folder, for the convnets loader; an ImageNet folder of JPEGs for --dali. The JSON
line holds one record per epoch (images, seconds, img/s over all ranks, the epoch boundary
included) and the mean over the epochs after the first (warm-up: cuDNN autotuning, the page
cache), or over all when there is only one.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="packed dataset (convnets), or ImageNet JPEG folder (--dali)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help="per GPU")
    p.add_argument("--workers", type=int, default=0,
                   help="CPU decode threads per process (0: this process's share of the cores)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lr", type=float, default=None, help="default: 0.1 x global batch / 256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-amp", action="store_true", help="train in fp32 (images fp32)")
    p.add_argument("--hw-decoder-load", type=float, default=None,
                   help="share of JPEGs for the GPU's hardware decoder (convnets and DALI)")
    p.add_argument("--loader-device", choices=["cuda", "cpu"], default="cuda",
                   help="convnets loader: decode on the GPU (default) or on CPU threads")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--synthetic", action="store_true", help="one fixed GPU batch (compute-only reference)")
    source.add_argument("--dali", action="store_true", help="feed the loop with NVIDIA DALI instead")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="--synthetic: steps per epoch (default: what --data would give, else 500)")
    args = p.parse_args()
    if not args.synthetic and not args.data:
        p.error("--data is needed (or --synthetic)")
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be at least 1")
    return args


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def setup_distributed():
    """(rank, world size, local rank) under torchrun (NCCL), else (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    return dist.get_rank(), dist.get_world_size(), local_rank


def convnets_batches(args, rank, world):
    """convnets.Loader: each call of the returned function runs one epoch."""
    try:
        import convnets
    except ImportError as e:
        sys.exit(f"convnets is not importable ({e}): build it with scripts/setup (CPU) or "
                 "scripts/python-gpu-build and put dist/python-gpu on PYTHONPATH")
    if args.loader_device == "cuda" and not convnets.CUDA:
        sys.exit("this convnets build has no GPU loader: use dist/python-gpu from "
                 "scripts/python-gpu-build, or --loader-device cpu")
    loader = convnets.Loader(
        args.data,
        batch_size=args.batch_size,
        device=args.loader_device,
        image_size=args.image_size,
        dtype=torch.float32 if args.no_amp else torch.float16,
        channels_last=True,
        seed=args.seed,
        threads=args.workers,
        hw_decoder_load=args.hw_decoder_load,
        rank=rank,
        world_size=world,
    )

    def epoch():
        for images, labels in loader:
            if images.device.type != "cuda":
                images = images.cuda(non_blocking=True)
                labels = labels.cuda(non_blocking=True)
            yield images, labels

    return epoch, len(loader)


def synthetic_batches(args, world):
    """One fixed batch on the GPU, `steps` times per epoch."""
    steps = args.steps_per_epoch
    if steps is None and args.data:
        import convnets

        records = convnets.Dataset(args.data).splits["train"]
        steps = records // world // args.batch_size
    steps = steps or 500
    dtype = torch.float32 if args.no_amp else torch.float16
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device="cuda", dtype=dtype)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch_size,), device="cuda")

    def epoch():
        for _ in range(steps):
            yield images, labels

    return epoch, steps


def dali_batches(args, rank, world, local_rank):
    """DALI's file reader, nvJPEG mixed decode with random crop, resize, flip and
    normalize, in NHWC fp16 (a channels_last NCHW view is handed on)."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy
    except ImportError as e:
        sys.exit(f"--dali needs NVIDIA DALI, which is not installed here ({e}); install it with "
                 "`pip install nvidia-dali-cuda130` (or the package for this CUDA), or drop --dali")
    train = os.path.join(args.data, "train")
    if not os.path.isdir(train):
        sys.exit(f"--dali reads an ImageNet folder of JPEGs: {train} is not a folder")
    mean = [0.485 * 255, 0.456 * 255, 0.406 * 255]
    std = [0.229 * 255, 0.224 * 255, 0.225 * 255]

    @pipeline_def
    def pipeline():
        jpegs, labels = fn.readers.file(
            file_root=train, random_shuffle=True, shard_id=rank, num_shards=world, name="Reader",
            seed=args.seed,
        )
        decode = dict(device="mixed", output_type=types.RGB, random_area=[0.08, 1.0],
                      random_aspect_ratio=[0.75, 4.0 / 3.0])
        if args.hw_decoder_load is not None:
            decode["hw_decoder_load"] = args.hw_decoder_load
        images = fn.decoders.image_random_crop(jpegs, **decode)
        images = fn.resize(images, resize_x=args.image_size, resize_y=args.image_size)
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT if args.no_amp else types.FLOAT16, output_layout="HWC",
            mean=mean, std=std, mirror=fn.random.coin_flip(probability=0.5),
        )
        return images, labels.gpu()

    threads = args.workers or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    pipe = pipeline(batch_size=args.batch_size, num_threads=threads, device_id=local_rank, seed=args.seed + rank,
                    prefetch_queue_depth=3)
    pipe.build()
    it = DALIClassificationIterator(pipe, reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP,
                                    auto_reset=True)

    def epoch():
        for out in it:
            images = out[0]["data"].permute(0, 3, 1, 2)  # NHWC memory: channels_last NCHW
            labels = out[0]["label"].view(-1).long()
            yield images, labels

    return epoch, len(it)


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("this example trains on a GPU; torch sees none")
    rank, world, local_rank = setup_distributed()
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    source = "synthetic" if args.synthetic else "dali" if args.dali else "convnets"
    if args.synthetic:
        epoch_batches, steps = synthetic_batches(args, world)
    elif args.dali:
        epoch_batches, steps = dali_batches(args, rank, world, local_rank)
    else:
        epoch_batches, steps = convnets_batches(args, rank, world)
    if steps == 0:
        sys.exit("no full batch per epoch: use a smaller --batch-size or more data")

    import torchvision

    model = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank])
    lr = args.lr if args.lr is not None else 0.1 * args.batch_size * world / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    amp = not args.no_amp
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    if rank == 0:
        log(f"{source}: resnet50, {world} GPU(s) ({torch.cuda.get_device_name()}), batch {args.batch_size} per GPU, "
            f"{steps} steps per epoch, {'AMP fp16' if amp else 'fp32'}, channels_last")

    epochs = []
    for epoch in range(args.epochs):
        model.train()
        torch.cuda.synchronize()
        start, images_seen, loss = time.perf_counter(), 0, None
        for images, labels in epoch_batches():
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            images_seen += images.shape[0]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        total = images_seen * world  # every rank runs the same number of full batches
        record = {"epoch": epoch, "images": total, "seconds": round(seconds, 3),
                  "img_per_s": round(total / seconds, 1) if seconds > 0 else None,
                  "last_loss": None if loss is None else round(loss.item(), 4)}
        epochs.append(record)
        if rank == 0:
            log(json.dumps(record))

    if rank == 0:
        timed = epochs[1:] if len(epochs) > 1 else epochs
        images = sum(e["images"] for e in timed)
        seconds = sum(e["seconds"] for e in timed)
        result = {
            "source": source,
            "model": "resnet50",
            "gpus": world,
            "gpu_name": torch.cuda.get_device_name(),
            "batch_size_per_gpu": args.batch_size,
            "image_size": args.image_size,
            "amp": amp,
            "workers": args.workers,
            "loader_device": args.loader_device if source == "convnets" else None,
            "epochs": epochs,
            "img_per_s": round(images / seconds, 1) if seconds > 0 else None,
            "img_per_s_over": "epochs after the first" if len(epochs) > 1 else "the only epoch",
            "finite_loss": all(e["last_loss"] is not None and math.isfinite(e["last_loss"]) for e in epochs),
        }
        print(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
