"""The image loader of the training loop: uint8 shards streamed from disk, never the whole dataset in memory.

Every rank draws the same permutation of the train split's rows (the loop's data-order generator) and takes its
own contiguous slice of each global batch, as for tables. Only those rows are read: each one by a positioned
read of its bytes in its shard file (`os.preadv`; the operating system's page cache, not the process, holds what
was read), so the process's memory is a few batches whatever the dataset's size. A background thread reads,
augments and copies the next PREFETCH batches to the device while the current one trains. The model normalises
its uint8 input itself (tasks/training/cnn.py), as the package does.

train.augment crop_flip: each image shifted by a random crop of the image zero-padded by 1/8 of its size and
flipped left-right with probability 1/2. The draws are made for the whole global batch from (train.seed, epoch,
step) and each rank takes its slice: an image is augmented alike on 1 or N ranks and after a resume, which is
what makes 2 ranks equal 1 process and a resumed run equal an uninterrupted one.

The interface the loop uses is `Features`' (tasks/training/data.py): n_train, n_val, schema, transform,
start_epoch, train_batch, val_batches, close.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from tasks.errors import UserError
from tasks.training.data import rank_slice

PREFETCH = 2  # global batches read ahead of the one training
EVAL_IMAGES = 1024  # validation images scored at once per rank


class Shards:
    """One split's shards: row i of the split is row i - starts[k] of shard k (in schema.json's order)."""

    def __init__(self, root: Path, entries: list[dict], shape: list[int]):
        self.shape, self.row_bytes = tuple(shape), math.prod(shape)
        self.paths = [root / e["images"] for e in entries]
        self.starts = np.cumsum([0] + [e["rows"] for e in entries])
        self.offsets = [self._offset(p, e["rows"]) for p, e in zip(self.paths, entries)]
        labels = [np.load(root / e["labels"]) for e in entries]
        self.labels = torch.from_numpy(np.concatenate(labels) if labels else np.zeros(0, np.int64))
        self.fds: dict[int, int] = {}

    def _offset(self, path: Path, rows: int) -> int:
        """Where the pixels start in the .npy file, once its header is checked against schema.json."""
        try:
            m = np.load(path, mmap_mode="r")  # maps, reads only the header
        except (OSError, ValueError) as e:
            raise UserError(f"train: {path} is not a readable shard ({e}); rerun the preprocess stage") from None
        if m.dtype != np.uint8 or m.shape != (rows, *self.shape) or not m.flags.c_contiguous:
            raise UserError(
                f"train: {path} holds {m.dtype} {m.shape}, schema.json says uint8 {(rows, *self.shape)}; "
                "rerun the preprocess stage"
            )
        offset = int(m.offset)
        del m
        return offset

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _fd(self, k: int) -> int:
        if k not in self.fds:
            self.fds[k] = os.open(self.paths[k], os.O_RDONLY)
        return self.fds[k]

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """The images of these rows, uint8 (n, C, H, W): one positioned read per row."""
        out = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for j, (k, i) in enumerate(zip(shard.tolist(), (rows - self.starts[shard]).tolist())):
            if os.preadv(self._fd(k), [out[j].data], self.offsets[k] + i * self.row_bytes) != self.row_bytes:
                raise UserError(f"train: {self.paths[k]} is truncated (row {i}); rerun the preprocess stage")
        return torch.from_numpy(out.reshape(-1, *self.shape))

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1, uint8: one positioned read per shard they span."""
        out = np.empty((stop - start, self.row_bytes), dtype=np.uint8)
        k = int(np.searchsorted(self.starts, start, side="right") - 1)
        at = start
        while at < stop:
            take = min(stop, int(self.starts[k + 1])) - at
            view = out[at - start : at - start + take].reshape(-1)
            if os.preadv(self._fd(k), [view.data], self.offsets[k] + (at - int(self.starts[k])) * self.row_bytes) != view.nbytes:
                raise UserError(f"train: {self.paths[k]} is truncated; rerun the preprocess stage")
            at, k = at + take, k + 1
        return torch.from_numpy(out.reshape(-1, *self.shape))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def crop_flip(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws for a global batch: each image's (dy, dx) shift within a padding of 1/8 of its size, and its flip."""
    n, _, h, w = images.shape
    py, px = max(1, h // 8), max(1, w // 8)
    dy = torch.randint(-py, py + 1, (n,), generator=generator)
    dx = torch.randint(-px, px + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return dy, dx, flip


def augmented(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each image shifted by (dy, dx) with zeros shifted in, and flipped left-right where `flip`: one gather."""
    n, c, h, w = images.shape
    py, px = max(1, h // 8), max(1, w // 8)
    padded = torch.nn.functional.pad(images, (px, px, py, py))
    iy = torch.arange(h)[None, :] + py + dy[:, None]
    ix = torch.arange(w)[None, :] + px + dx[:, None]
    ix = torch.where(flip[:, None], ix.flip(1), ix)
    return padded[
        torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], iy[:, None, :, None], ix[:, None, None, :]
    ]


def batch_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The augmentation draws of one global batch: a function of where it is in training, not of what ran before."""
    key = hashlib.sha256(f"{seed}:{epoch}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "big") & (2**63 - 1))


class ImageData:
    """The train and validation shards of preprocess.out_dir, streamed to one rank."""

    def __init__(self, feat_dir: Path, device: torch.device, objective, rank: int, world: int, cfg):
        self.schema = json.loads((feat_dir / "schema.json").read_text())
        self.transform = json.loads((feat_dir / "transform.json").read_text())
        shape = [self.schema["image"]["channels"], *self.schema["image"]["size"]]
        self.train, self.val = (Shards(feat_dir, self.schema["shards"][split], shape) for split in ("train", "val"))
        self.device, self.objective, self.rank, self.world = device, objective, rank, world
        self.batch_size, self.accum, self.seed, self.augment = cfg.batch_size, cfg.grad_accum_steps, cfg.seed, cfg.augment
        self.queue: queue.Queue = queue.Queue(PREFETCH)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_val(self) -> int:
        return len(self.val)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.objective.prepare(y)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def start_epoch(self, perm: torch.Tensor, epoch: int, skip: int) -> None:
        """Read this epoch's batches from step `skip` on, in the background, PREFETCH ahead."""
        self.close()
        self.stop, self.queue = threading.Event(), queue.Queue(PREFETCH)
        self.thread = threading.Thread(target=self._produce, args=(perm.cpu(), epoch, skip), name="trainflow-loader", daemon=True)
        self.thread.start()

    def _produce(self, perm: torch.Tensor, epoch: int, skip: int) -> None:
        try:
            for step, start in enumerate(range(0, len(perm), self.batch_size)):
                if step < skip:
                    continue
                idx = perm[start : start + self.batch_size]
                lo, hi = self.rank * len(idx) // self.world, (self.rank + 1) * len(idx) // self.world
                mine = rank_slice(idx, self.rank, self.world)
                x, y = self.train.read(mine.numpy()), self.train.labels[mine]
                if self.augment == "crop_flip":
                    dy, dx, flip = crop_flip(torch.empty(len(idx), *x.shape[1:]), batch_generator(self.seed, epoch, step))
                    x = augmented(x, dy[lo:hi], dx[lo:hi], flip[lo:hi])
                k = self.accum  # micro-batches, as the loop cuts them (tensor_split sizes depend on the length only)
                micro = [
                    (part, *self._to_device(xb, yb))
                    for part, xb, yb in zip(mine.tensor_split(k), x.tensor_split(k), y.tensor_split(k))
                ]
                if not self._put(micro):
                    return
        except BaseException as e:  # raised in the training thread, where train_batch takes it
            self._put(e)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def train_batch(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch read ahead: it must be the rows the loop asks for (the same order on both sides)."""
        if not getattr(self, "pending", None):
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            self.pending = list(item)
        rows, x, y = self.pending.pop(0)
        assert torch.equal(rows, part.cpu()), "the loader and the loop disagree on the batch order"
        return x, y

    def val_batches(self, rank: int, world: int):
        """This rank's contiguous share of the validation split, in the same number of chunks on every rank (FSDP
        needs every rank in every forward)."""
        n = self.n_val
        lo, hi = rank * n // world, (rank + 1) * n // world
        chunks = max(1, math.ceil(math.ceil(n / world) / EVAL_IMAGES))
        for c in torch.arange(lo, hi).tensor_split(chunks):
            a, b = (int(c[0]), int(c[-1]) + 1) if len(c) else (lo, lo)
            yield self._to_device(self.val.read_range(a, b), self.val.labels[a:b])

    def close(self) -> None:
        """Stop reading ahead (the run ended, or the epoch was left early)."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self.pending = []


def test_split(feat_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole test split, uint8 images and class indices, for the evaluate stage (which scores it in chunks)."""
    schema = json.loads((feat_dir / "schema.json").read_text())
    shards = Shards(feat_dir, schema["shards"]["test"], [schema["image"]["channels"], *schema["image"]["size"]])
    try:
        return shards.read_range(0, len(shards)), shards.labels
    finally:
        shards.close()
