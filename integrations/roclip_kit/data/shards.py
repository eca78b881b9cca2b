"""WebDataset shards as a scan's input: each sample's ``__key__``, caption and image bytes.

Web-scale datasets are tar shards, not CSVs (``img2dataset`` writes them, OpenCLIP trains on
them with ``--dataset-type webdataset``). A sample is the tar members sharing one key: an image
(``jpg``, ``png``, ``jpeg`` or ``webp``, OpenCLIP's ``image`` keys) and a caption (``txt``).
Shards are read with the ``webdataset`` package's own readers (``SimpleShardList`` and
``tarfile_to_samples``, what OpenCLIP's pipeline is built from), in shard order, so row ``i``
of a scan is the ``i``-th sample of the expanded shard list, every time. Two passes: the keys
and captions first (the scan needs its row count and the captions before any image), then the
images, streamed chunk by chunk while embedding.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")
CAPTION_EXTENSION = "txt"


def shard_urls(spec: str) -> list[str]:
    """The shards of ``spec``: brace-expanded (``{00000..00009}``), local files checked.

    A missing local shard is named before anything is read; URLs (``pipe:``, ``http://``) are
    left to webdataset.
    """
    from braceexpand import braceexpand

    urls = [url for part in spec.split("::") for url in braceexpand(part)]
    if not urls or not spec.strip():
        raise ValueError("--shards is empty: give shards like '/data/{00000..00009}.tar'")
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise ValueError(f"--shards: shard {url} does not exist; fix the path or the range")
    return urls


def samples(urls: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Every sample of the shards in order, undecoded (member bytes by extension)."""
    import webdataset as wds

    return iter(wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples()))


def image_bytes(sample: dict[str, Any]) -> bytes:
    """The sample's image member; a sample without one is refused, naming its key."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(
        f"sample {sample.get('__key__')} of {sample.get('__url__')} has no image "
        f"({', '.join(IMAGE_EXTENSIONS)}); remove it from the shard or add its image"
    )


def caption_of(sample: dict[str, Any]) -> str:
    """The sample's ``txt`` member as text; a sample without one is refused, naming its key."""
    if CAPTION_EXTENSION not in sample:
        raise ValueError(
            f"sample {sample.get('__key__')} of {sample.get('__url__')} has no caption "
            f"({CAPTION_EXTENSION}); remove it from the shard or add its caption"
        )
    return sample[CAPTION_EXTENSION].decode("utf-8").strip()


def keys_and_captions(urls: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """The first pass: each sample's key, caption and shard, in order.

    Keys must be unique: they are what the key list and a manifest name rows by.
    """
    keys: list[str] = []
    captions: list[str] = []
    where: list[str] = []
    try:
        for sample in samples(urls):
            image_bytes(sample)  # a sample without an image fails now, not halfway
            keys.append(str(sample["__key__"]))
            captions.append(caption_of(sample))
            where.append(str(sample.get("__url__", "")))
    except (OSError, tarfile.TarError, UnicodeDecodeError) as err:
        raise ValueError(f"--shards: a shard cannot be read ({err}); check it is a tar") from None
    if not keys:
        raise ValueError(f"--shards: {len(urls)} shard(s) hold no samples; check the shards")
    if len(set(keys)) != len(keys):
        raise ValueError("--shards: a __key__ occurs twice; keys must name one sample each")
    return keys, captions, where


def stream_chunks(
    urls: Sequence[str], keys: Sequence[str], chunks: Sequence[range]
) -> Iterator[tuple[range, list[io.BytesIO]]]:
    """The images of each of ``chunks`` (ascending row ranges), in one pass over the shards.

    Samples before and between the chunks are read but not decoded (a resumed scan skips the
    embedded ones). A key that differs from the first pass's means the shards changed between
    the passes: refused rather than embedding one sample under another's key.
    """
    stream = enumerate(samples(urls))
    for rows in chunks:
        images = []
        for row, sample in stream:
            if row < rows.start:
                continue
            if str(sample["__key__"]) != keys[row]:
                raise ValueError(
                    f"--shards: row {row} is now {sample['__key__']}, was {keys[row]}: the "
                    "shards changed during the scan; scan them again"
                )
            images.append(io.BytesIO(image_bytes(sample)))
            if row == rows.stop - 1:
                break
        if len(images) != len(rows):
            raise ValueError("--shards: the shards hold fewer samples than when first read")
        yield rows, images
