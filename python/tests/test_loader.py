"""convnets.Loader on the CPU against the Rust loader, and its Python-side contract:
epochs, resume, ranks, errors, tensor lifetime, Ctrl-C."""

import gc
import inspect
import os
import shutil
import signal
import threading

import pytest
import torch

import convnets
from conftest import index_of_pixel, rust_batches, shard_files

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "u8": torch.uint8}


def epochs_of(loader, epochs):
    """{(epoch, index): (images, labels)} over `epochs` whole epochs."""
    out = {}
    for _ in range(epochs):
        epoch = loader.epoch
        for index, (images, labels) in enumerate(loader):
            out[(epoch, index)] = (images, labels)
    return out


@pytest.mark.parametrize(
    "options",
    [
        # training crops, fp32 NCHW, two epochs (a fresh shuffle and fresh crops each)
        dict(transform="train", dtype="f32", layout="nchw", seed=3, batch=8, size=32, epochs=2),
        # evaluation crops, bf16 channels_last, rank 1 of 2 (partial last batch kept)
        dict(transform="eval", dtype="bf16", layout="nhwc", seed=0, batch=5, size=24, rank=1, world=2),
        # uint8 (not normalised), the val split
        dict(transform="train", dtype="u8", layout="nhwc", seed=7, batch=3, size=16, split="val"),
    ],
    ids=["train-f32-nchw", "eval-bf16-rank1of2", "val-u8"],
)
def test_batches_equal_the_rust_loaders(textured_dataset, tmp_path, options):
    expected = rust_batches(textured_dataset, tmp_path / "rust.safetensors", **options)
    loader = convnets.Loader(
        textured_dataset,
        split=options.get("split", "train"),
        batch_size=options["batch"],
        device="cpu",
        transform=options["transform"],
        image_size=options["size"],
        dtype=DTYPES[options["dtype"]],
        channels_last=options["layout"] == "nhwc",
        seed=options["seed"],
        rank=options.get("rank", 0),
        world_size=options.get("world", 1),
        threads=3,
    )
    got = epochs_of(loader, options.get("epochs", 1))
    assert len(loader) == len(got) // options.get("epochs", 1)
    assert sorted(got) == sorted(expected)
    for key, (images, labels) in got.items():
        want_images, want_labels = expected[key]
        assert images.dtype == DTYPES[options["dtype"]] and labels.dtype == torch.int64
        assert images.is_contiguous(
            memory_format=torch.channels_last if options["layout"] == "nhwc" else torch.contiguous_format
        )
        assert torch.equal(labels, want_labels), key
        assert torch.equal(images, want_images), key


def test_resume_from_state_dict_gives_the_same_remaining_batches(textured_dataset):
    def loader():
        return convnets.Loader(textured_dataset, batch_size=4, device="cpu", image_size=16, seed=11)

    full = loader()
    assert len(full) == 9
    reference = [labels for _ in range(2) for _, labels in full]

    # Stop after 6 batches of epoch 0, and after a whole epoch plus 2 batches.
    for taken in (6, 9 + 2):
        first = loader()
        got = []
        it = iter(first)
        for _ in range(taken):
            try:
                got.append(next(it)[1])
            except StopIteration:
                it = iter(first)
                got.append(next(it)[1])
        state = first.state_dict()
        assert state == {"epoch": taken // 9, "batch": taken % 9}
        first.close()

        resumed = loader()
        resumed.load_state_dict(state)
        assert resumed.epoch == state["epoch"]
        got += [labels for labels in (b[1] for b in resumed)]  # the rest of that epoch
        if state["epoch"] == 0:
            got += [b[1] for b in resumed]  # and the next
        assert len(got) == len(reference)
        assert all(torch.equal(a, b) for a, b in zip(got, reference)), taken


def test_an_epoch_left_early_continues_and_a_finished_one_starts_the_next(textured_dataset):
    loader = convnets.Loader(textured_dataset, batch_size=12, device="cpu", image_size=16)
    assert len(loader) == 3
    for i, _ in enumerate(loader):
        if i == 0:
            break
    assert len(list(loader)) == 2  # the rest of epoch 0
    assert loader.state_dict() == {"epoch": 1, "batch": 0}
    # Taking exactly len() batches without reaching StopIteration still ends the epoch.
    it = iter(loader)
    for _ in range(3):
        next(it)
    assert len(list(loader)) == 3 and loader.epoch == 3


def test_two_ranks_cover_the_split_exactly_once(solid_dataset):
    for transform, split, records in (("train", "train", 24), ("eval", "val", 9)):
        seen = []
        for rank in range(2):
            loader = convnets.Loader(
                solid_dataset, split=split, batch_size=2, device="cpu", transform=transform,
                image_size=8, dtype=torch.uint8, rank=rank, world_size=2, seed=5,
            )
            for images, labels in loader:
                # uint8 NCHW values, channels_last memory: the centre pixel names the record
                centre = images[:, :, 4, 4]
                seen += [index_of_pixel(px.tolist()) for px in centre]
        offset = 0 if split == "train" else 24  # val images are numbered after train's
        assert sorted(seen) == [offset + i for i in range(records)], (transform, sorted(seen))


def test_rank_and_world_size_default_to_torchrun_environment(solid_dataset, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    loader = convnets.Loader(solid_dataset, batch_size=2, device="cpu", image_size=8)
    assert len(loader) == 4  # 24 records / 3 ranks / 2 per batch
    explicit = convnets.Loader(solid_dataset, batch_size=2, device="cpu", image_size=8, rank=0, world_size=1)
    assert len(explicit) == 12


def damaged_copy(dataset, tmp_path):
    """A copy of `dataset` whose first train shard has a bit flipped in its record 0."""
    copy = tmp_path / "damaged"
    shutil.copytree(dataset, copy)
    victim = shard_files(copy, "train")[0]
    path = copy / victim
    data = bytearray(path.read_bytes())
    data[16 + 200] ^= 0x20  # 16: the shard header; record 0 follows it
    path.write_bytes(bytes(data))
    return copy, victim


def test_a_damaged_shard_raises_naming_the_shard_and_record(textured_dataset, tmp_path):
    copy, victim = damaged_copy(textured_dataset, tmp_path)
    loader = convnets.Loader(copy, batch_size=36, device="cpu", image_size=16)
    with pytest.raises(convnets.Error) as e:
        for _ in loader:
            pass
    assert victim in str(e.value) and "record 0" in str(e.value), str(e.value)
    assert isinstance(e.value, RuntimeError)


def test_a_damaged_record_is_skipped_and_listed_under_skip(textured_dataset, tmp_path):
    copy, victim = damaged_copy(textured_dataset, tmp_path)
    loader = convnets.Loader(copy, batch_size=6, device="cpu", image_size=16, on_bad_record="skip")
    assert len(list(loader)) == 6
    skipped = loader.skipped()
    # A CRC mismatch names its shard in the reason (the pipeline fills `shard` for decode
    # failures only).
    assert len(skipped) == 1 and skipped[0]["record"] == 0, skipped
    assert victim in skipped[0]["shard"] + skipped[0]["reason"], skipped
    assert loader.stats()["skipped"] == 1
    assert loader.skipped() == []


def test_tensors_survive_later_batches_and_the_loader(textured_dataset, tmp_path):
    expected = rust_batches(
        textured_dataset, tmp_path / "rust.safetensors", batch=4, size=16, dtype="f16", layout="nhwc", epochs=2
    )
    loader = convnets.Loader(textured_dataset, batch_size=4, device="cpu", image_size=16)
    kept = [batch for batch in loader]  # every batch of epoch 0 held at once
    kept += [next(iter(loader))]  # and the first of epoch 1
    del loader
    gc.collect()
    # More loaders on the same process reuse freed memory; the kept tensors must not see it.
    for _ in range(2):
        list(convnets.Loader(textured_dataset, batch_size=4, device="cpu", image_size=16, seed=99))
    keys = [(0, i) for i in range(9)] + [(1, 0)]
    for key, (images, labels) in zip(keys, kept):
        assert torch.equal(images, expected[key][0]) and torch.equal(labels, expected[key][1]), key


def test_ctrl_c_interrupts_a_wait_and_the_stream_stays_exact(textured_dataset):
    def loader():
        # Slow enough batches (large output, one thread) that the waits are interrupted.
        return convnets.Loader(textured_dataset, batch_size=12, device="cpu", image_size=384, threads=1)

    reference = [labels for labels in (b[1] for b in loader())]
    interrupted = loader()

    # SIGINT arrives every 20 ms. Its handler raises KeyboardInterrupt, as Python's default
    # one does, but only while the loader is inside `next_batch` (the native object is
    # then borrowed, so asking it for its state fails): one arriving just after a batch was
    # returned would interrupt the test's own bookkeeping, not the loader.
    def handler(signum, frame):
        try:
            interrupted._native.state()
        except RuntimeError:
            raise KeyboardInterrupt from None

    stop = threading.Event()

    def pester():
        while not stop.wait(0.02):
            os.kill(os.getpid(), signal.SIGINT)

    got, interrupts = [], 0
    previous = signal.signal(signal.SIGINT, handler)
    sender = threading.Thread(target=pester)
    sender.start()
    try:
        it = iter(interrupted)
        while True:
            try:
                got.append(next(it)[1])
            except KeyboardInterrupt:
                interrupts += 1
                it = iter(interrupted)  # a new loop over the same epoch, as after Ctrl-C
            except StopIteration:
                break
    finally:
        stop.set()
        sender.join()
        signal.signal(signal.SIGINT, previous)
    assert interrupts > 0
    assert len(got) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


def test_bad_arguments_are_value_errors_and_gpu_requests_say_what_is_missing(textured_dataset):
    with pytest.raises(ValueError, match="transform"):
        convnets.Loader(textured_dataset, transform="random", device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        convnets.Loader(textured_dataset, batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="records make no batch"):
        convnets.Loader(textured_dataset, batch_size=1000, device="cpu")
    with pytest.raises(ValueError, match="memory"):
        convnets.Loader(textured_dataset, batch_size=1 << 20, image_size=1 << 16, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        convnets.Loader(textured_dataset, dtype=torch.float64, device="cpu")
    with pytest.raises(convnets.Error, match="no split 'test'|test"):
        convnets.Loader(textured_dataset, split="test", device="cpu")
    loader = convnets.Loader(textured_dataset, batch_size=4, device="cpu", image_size=16)
    with pytest.raises(ValueError):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="past the epoch"):
        loader.load_state_dict({"epoch": 0, "batch": 9})
    if not convnets.CUDA:
        with pytest.raises(convnets.Error, match="without CUDA"):
            convnets.Loader(textured_dataset, device="cuda")
        assert convnets.Loader(textured_dataset, batch_size=4, image_size=16).device == torch.device("cpu")


def test_dataset_describes_splits_and_classes(textured_dataset):
    ds = convnets.Dataset(textured_dataset)
    assert ds.splits == {"train": 36, "val": 6}
    assert ds.classes == ["n01440764", "n01443537", "n01484850"] and ds.num_classes == 3
    assert len(ds) == 42 and len(ds.class_names) == 3
    with pytest.raises(convnets.Error):
        convnets.Dataset(textured_dataset / "missing")
