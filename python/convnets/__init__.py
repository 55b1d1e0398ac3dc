"""convnets for PyTorch: the convnets loader as a drop-in for DALI's PyTorch iterator.

    import torch, convnets

    loader = convnets.Loader("data/imagenet-packed", batch_size=256, device="cuda")
    for epoch in range(epochs):
        for images, labels in loader:  # one epoch; fp16 channels_last, normalised
            ...

The batches are made in Rust (libjpeg-turbo on CPU threads, or nvJPEG and one fused
augment kernel on the GPU) and handed over as torch tensors: on the GPU without a copy.
"""

import ctypes
import glob
import json
import os

# libtorch (and libtorch_python) must be loaded before the extension, which links them.
import torch

__all__ = ["Dataset", "Error", "Loader", "pack_imagenet", "CUDA"]


def _cuda_library_dirs():
    """Folders that may hold nvJPEG and NVRTC: the `nvidia` wheels beside torch, then a CUDA
    toolkit."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"))
    for home in filter(None, homes):
        dirs += [os.path.join(home, "lib64"), os.path.join(home, "targets", "x86_64-linux", "lib")]
    return dirs


def _preload(stem):
    """Loads the first `stem`.so.* found in `_cuda_library_dirs` (by full path, globally), so
    that the extension, or the CUDA loader inside it, finds it by its soname. Best effort."""
    for folder in _cuda_library_dirs():
        for lib in sorted(glob.glob(os.path.join(folder, stem + ".so.[0-9]*"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                continue
    return False


try:
    from . import _convnets
except ImportError as e:
    # The GPU build links nvJPEG, which is found by the path it was built with or by
    # LD_LIBRARY_PATH; elsewhere it is in torch's `nvidia` wheels or the CUDA toolkit.
    if "nvjpeg" not in str(e) or not _preload("libnvjpeg"):
        raise
    from . import _convnets

CUDA = _convnets.CUDA
"""Whether this build has the GPU loader (nvJPEG decode and augment on the GPU)."""
if CUDA:
    # The GPU loader compiles its kernel with NVRTC, loaded when it starts.
    _preload("libnvrtc")

Error = _convnets.Error

_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.uint8: "uint8",
}


def _placement(rank, world_size):
    """(rank, world size, processes on this machine): torch.distributed's when it is
    initialised, else torchrun's environment (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE), else one
    process. Explicit arguments win."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        found = (dist.get_rank(), dist.get_world_size())
    else:
        found = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    rank = found[0] if rank is None else int(rank)
    world_size = found[1] if world_size is None else int(world_size)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return rank, world_size, local


def _gpu_index(device):
    """The CUDA device index of `device` ("auto", "cpu", "cuda", "cuda:N" or a torch.device),
    or None for the CPU loader."""
    if device == "auto":
        return torch.cuda.current_device() if CUDA and torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device}")
    if not CUDA:
        raise Error(
            "this convnets extension was built without CUDA (no GPU loader): "
            "use device='cpu', or build with scripts/python-gpu-build"
        )
    if not torch.cuda.is_available():
        raise Error("device='cuda': torch sees no GPU")
    return torch.cuda.current_device() if device.index is None else device.index


class Loader:
    """Batches of one rank from a packed dataset (or a TFRecord folder), as torch tensors.

    Iterating yields `(images, labels)` for one epoch: images `[B, 3, S, S]` of `dtype`
    (ImageNet-normalised unless uint8; channels_last memory if `channels_last`), labels `[B]`
    int64. The next `iter()` continues with the next epoch. A loop left early continues
    where it stopped: the position, `state_dict()`, is the next batch, and a new loader
    given it by `load_state_dict()` delivers exactly the batches that would have followed.

    device: "cuda" (or "cuda:N"): decode and augment on the GPU (nvJPEG, hardware JPEG
    engines and CPU threads), batches in GPU memory handed over without a copy; on
    libtorch's default stream. "cpu": CPU threads, batches in host memory (each batch is a
    copy of the loader's buffer, so it stays valid). "auto": "cuda" when this build and
    torch have a GPU, else "cpu".

    transform: "train" (RandomResizedCrop + flip, shuffled, the incomplete last batch
    dropped) or "eval" (resize to 8/7 of image_size + centre crop, in order, every image
    once) -- the loaders `convnets train` uses.

    rank / world_size default to torch.distributed's when it is initialised, else to the
    RANK / WORLD_SIZE environment variables torchrun sets, else 0 / 1; each rank gets its
    own share of every epoch (len() is per rank).

    hw_decoder_load: the GPU loader's share of images for the hardware JPEG decoder (like
    DALI's); default: the share `convnets train` picks for resnet50 from the CPU threads.
    threads: decode threads (0: this process's share of the machine's cores).
    drop_last / shuffle: default to the transform's (see above).
    on_bad_record: "error" raises convnets.Error naming the shard and record; "skip"
    replaces the sample by another of its batch and lists it in `skipped()`.
    """

    def __init__(
        self,
        path,
        split="train",
        batch_size=256,
        device="auto",
        transform="train",
        image_size=224,
        dtype=torch.float16,
        channels_last=True,
        seed=0,
        threads=0,
        hw_decoder_load=None,
        rank=None,
        world_size=None,
        drop_last=None,
        shuffle=None,
        on_bad_record="error",
        label_offset=1,
    ):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES.values())}, got {dtype}")
        rank, world_size, local = _placement(rank, world_size)
        gpu = _gpu_index(device)
        self.device = torch.device("cpu") if gpu is None else torch.device("cuda", gpu)
        self._native = _convnets.NativeLoader(
            os.fspath(path),
            split,
            int(batch_size),
            gpu,
            transform,
            int(image_size),
            _DTYPES[dtype],
            bool(channels_last),
            int(seed),
            int(threads),
            None if hw_decoder_load is None else float(hw_decoder_load),
            rank,
            world_size,
            local,
            drop_last,
            shuffle,
            on_bad_record,
            int(label_offset),
        )

    def __iter__(self):
        native = self._native
        epoch = native.state()[0]
        while True:
            batch = native.next_batch(epoch)
            if batch is None:
                return
            yield batch

    def __len__(self):
        """Batches per epoch (of this rank)."""
        return self._native.batches_per_epoch()

    @property
    def epoch(self):
        """The epoch of the next batch."""
        return self._native.state()[0]

    def state_dict(self):
        """The position: {"epoch", "batch"} of the next batch (save it with the model)."""
        epoch, batch = self._native.state()
        return {"epoch": epoch, "batch": batch}

    def load_state_dict(self, state):
        """Continues from a `state_dict()`: the next batch is the one it names (the
        loader's threads restart there)."""
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"a loader state is {{'epoch': int, 'batch': int}}, got {state!r}") from e
        if epoch < 0 or batch < 0:
            raise ValueError(f"a loader state holds no negative numbers, got {state!r}")
        self._native.load_state(epoch, batch)

    def stats(self):
        """The loader's counters (time per stage, images decoded by the hardware decoder,
        skipped records...) as of the last batch."""
        return json.loads(self._native.stats())

    def skipped(self):
        """Records skipped (on_bad_record="skip") since the last call: shard, record, reason."""
        return json.loads(self._native.take_skipped())

    def close(self):
        """Stops the loader's threads now (they stop anyway when the loader is collected)."""
        self._native.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Dataset:
    """A packed dataset folder: `splits` (name -> records), `classes` (WordNet ids in label
    order), `class_names`; len() is the number of records over all splits."""

    def __init__(self, path):
        native = _convnets.NativeDataset(os.fspath(path))
        self.path = native.path
        self.splits = dict(native.splits)
        self.classes = [wnid for wnid, _ in native.classes]
        self.class_names = [name for _, name in native.classes]

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return sum(self.splits.values())

    def __repr__(self):
        splits = ", ".join(f"{k}: {v}" for k, v in self.splits.items())
        return f"convnets.Dataset({str(self.path)!r}; {splits}; {self.num_classes} classes)"


def pack_imagenet(
    input,
    output,
    *,
    format="auto",
    val_labels=None,
    label_offset=1,
    train_shards=None,
    val_shards=None,
    shard_size=128 << 20,
    seed=0,
    threads=0,
    max_side=None,
    quality=95,
    awkward="reencode",
    decode_check=True,
    strict=False,
):
    """Packs an ImageNet folder (train/<wnid>/*.JPEG, val/) or a TFRecord folder into a
    dataset folder, as `convnets pack-imagenet` does; returns its report (records per split,
    and every file not stored as is, also written to pack-report.json)."""
    report = _convnets.pack_imagenet(
        os.fspath(input),
        os.fspath(output),
        format=format,
        val_labels=None if val_labels is None else os.fspath(val_labels),
        label_offset=int(label_offset),
        train_shards=train_shards,
        val_shards=val_shards,
        shard_size=int(shard_size),
        seed=int(seed),
        threads=int(threads),
        max_side=max_side,
        quality=int(quality),
        awkward=awkward,
        decode_check=bool(decode_check),
        strict=bool(strict),
    )
    return json.loads(report)


