"""What every benchmark shares: arguments, synchronised clocks, fake CIFAR-100 and Fashion-MNIST files, tables, JSON.

Every benchmark times ``distill`` next to a plain PyTorch baseline, interleaved (A, B, A, B, ...) so
both see the same machine load, and reports medians and their ratio. Results go to
``benchmarks/results/<name>.json`` (``<name>-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds), not a measurement")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/<name>.json)")
    return p


def clock(device: torch.device | str) -> float:
    """Seconds, after the device's queued work has finished."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def run_json_child(script: str, arguments: list[str], threads: int | None, what: str):
    """Run ``script`` with ``arguments`` in a fresh Python process (``OMP_NUM_THREADS=threads`` when set)
    and return the JSON on its last output line; a failure raises with ``what`` and the end of its stderr."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def environment(device: str) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_fake_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` in the official format, random pixels. Returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        entry = {"fine_labels": (np.arange(n) % 100).tolist(), "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / split).write_bytes(pickle.dumps(entry, protocol=4))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class_{i}" for i in range(100)]}, protocol=4))
    return root


def write_fake_fashion_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """The four gzipped Fashion-MNIST IDX files under ``root``, random pixels and labels. Returns ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
        labels = (np.arange(n) % 10).astype(np.uint8).tobytes()
        header = (0x803).to_bytes(4, "big") + b"".join(k.to_bytes(4, "big") for k in (n, 28, 28))
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress((0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + labels)
        )
    return root


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def write_json(name: str, args: argparse.Namespace, payload: dict) -> Path:
    path = args.out or RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {"benchmark": name, "options": options, "environment": environment(args.device), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def write_fake_jpeg_folder(root: Path, n_images: int, num_classes: int = 10, seed: int = 0) -> tuple[Path, float]:
    """``root/{train,val}/class_K/*.JPEG`` with ImageNet-like photographs' sizes (about 500×375, ~110 kB).

    Smooth random colour fields plus grain, saved at quality 95; ``val/`` holds one image per class.
    Returns ``root`` and the mean training file size in kB.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = []
    for split, n in (("train", n_images), ("val", num_classes)):
        for i in range(n):
            height, width = int(rng.integers(330, 501)), int(rng.integers(375, 501))
            coarse = Image.fromarray(rng.integers(0, 256, (height // 24, width // 24, 3), dtype=np.uint8))
            pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
            pixels = pixels + rng.integers(-16, 17, pixels.shape, dtype=np.int16)
            folder = root / split / f"class_{i % num_classes}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i}.JPEG"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=95)
            if split == "train":
                sizes.append(path.stat().st_size)
    return root, float(np.mean(sizes)) / 1e3


def loader_pass(loader, device: str):
    """One pass of a plain ``(images, targets)`` DataLoader, the batches moved to ``device``.

    Returns the image count.
    """

    def one_pass() -> int:
        n = 0
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            n += len(targets)
        return n

    return one_pass


def datamodule_pass(dm, device: str):
    """One pass of a distill DataModule's training loader through its transfer hooks, as a training run
    sees it (the crops' step counter advancing); returns the image count."""
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=True, global_step=0)  # what the transfer hooks read
    loader = dm.train_dataloader()

    def one_pass() -> int:
        n = 0
        for batch in loader:
            images, targets, _ = dm.on_after_batch_transfer(dm.transfer_batch_to_device(batch, device, 0), 0)
            dm.trainer.global_step += 1
            n += len(targets)
        return n

    return one_pass


def time_pipelines(pipelines: dict, images: int, repeats: int, device: str) -> list[dict]:
    """Interleaved passes (A, B, C, A, B, C, ...) of every pipeline; per pipeline the median seconds,
    images/s and speed-up over the first one (the baseline)."""
    seconds: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, one_pass in pipelines.items():
            start = clock(device)
            if one_pass() != images:
                raise RuntimeError(f"{name}: a pass did not yield {images} images")
            seconds[name].append(clock(device) - start)
    base = median(next(iter(seconds.values())))
    return [
        {"pipeline": name, "median_s": median(s), "images_per_s": images / median(s), "speedup": base / median(s)}
        for name, s in seconds.items()
    ]
