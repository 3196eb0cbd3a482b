"""Image files as uint8 tensors through TorchCodec: libjpeg-turbo on the CPU, nvJPEG on a CUDA device.

TorchCodec (``pip install 'distill[fast-decode]'``) is the PyTorch project's image decoder; it
supersedes ``torchvision.io``'s decoders, deprecated since torchvision 0.29.

For decoding on the device, a DataLoader worker only reads each file (:func:`read_for_device`) and
:func:`decode_to` decodes a batch's JPEGs with one call on the device. nvJPEG takes 1- and 3-channel
JPEGs; the rest (CMYK JPEGs, and the odd PNG that ImageNet's training set holds under a ``.JPEG``
name) the worker decodes on its CPU (project choice: route by header rather than fail on the GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import MissingPackageError

# The markers that start a frame header (SOF0-SOF15 without DHT, JPG and DAC).
_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_NVJPEG_COMPONENTS = (1, 3)


def torchcodec_decoders():
    """``torchcodec.decoders``, or an ImportError saying how to install it."""
    try:
        from torchcodec import decoders
    except ImportError as error:
        raise MissingPackageError(
            f"decoding images to tensors needs TorchCodec ({error}); install it with "
            "`pip install 'distill[fast-decode]'`, or use decode: pil"
        ) from error
    return decoders


def jpeg_components(data: bytes) -> int | None:
    """Colour components in a JPEG's frame header (1 grey, 3 YCbCr, 4 CMYK); None if ``data`` is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker in _FRAME_MARKERS:
            return data[position + 9] if position + 9 < len(data) else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        position += 2 + length
    return None


def decode_file(path: str) -> torch.Tensor:
    """The image at ``path`` as a uint8 ``(3, H, W)`` RGB tensor (any format TorchCodec reads)."""
    try:
        return torchcodec_decoders().decode_image(path, mode="RGB")
    except RuntimeError as error:
        raise RuntimeError(f"{path}: cannot decode image ({error})") from error


def read_for_device(path: str) -> torch.Tensor:
    """The file's bytes as a 1-D uint8 tensor when nvJPEG can decode it, else the image decoded here (3-D)."""
    data = Path(path).read_bytes()
    if jpeg_components(data) in _NVJPEG_COMPONENTS:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_file(path)


def decode_to(items: list[torch.Tensor], device: torch.device, name: Callable[[int], str] = str) -> list[torch.Tensor]:
    """Items of :func:`read_for_device` as uint8 ``(3, H, W)`` images on ``device``: encoded ones in one batched call.

    ``name(i)`` names item ``i`` in the error raised when a JPEG does not decode.
    """
    encoded = [i for i, item in enumerate(items) if item.dim() == 1]
    images = [item if item.dim() == 3 else None for item in items]
    if encoded:
        decode_jpeg = torchcodec_decoders().decode_jpeg
        try:
            decoded = decode_jpeg([items[i] for i in encoded], mode="RGB", device=device)
        except RuntimeError:  # one bad file fails the whole call: find it and name it
            for i in encoded:
                try:
                    decode_jpeg(items[i], mode="RGB", device=device)
                except RuntimeError as error:
                    raise RuntimeError(f"{name(i)}: cannot decode JPEG on {device} ({error})") from error
            raise
        for i, image in zip(encoded, decoded):
            images[i] = image
    return [image.to(device, non_blocking=True) for image in images]
