"""Backdoor triggers: the same object stamps training images and, at test time, test images.

Every trigger is fixed by its parameters and ``seed``: its noise pattern (or warping field) is
drawn once at a base resolution and resized to each image, so one trigger works at any image
size, and ``trigger_from_dict(t.to_dict())`` rebuilds an identical trigger for evaluation.
``apply`` returns a new image of the same size and mode (L, RGB and RGBA keep their mode and
alpha; other modes go through RGB and back).

- ``patch``: a random-noise square pasted on the image (BadNets-style, as in the RoCLIP paper).
- ``blend``: a fixed full-image noise pattern blended in with weight ``alpha``.
- ``wanet``: an imperceptible smooth warp (WaNet): a random ``k x k`` displacement field,
  upsampled to the image and scaled by ``strength``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PATCH_POSITIONS = ("random", "top-left", "top-right", "bottom-left", "bottom-right", "center")
PATCH_GRID = 8  # noise cells across a patch: the pattern keeps its blocks at any patch size
BLEND_GRID = 32  # noise cells across a blended image
KEPT_MODES = ("L", "RGB", "RGBA")
MAX_WANET_K = 64  # the field is k x k; beyond this it is noise, and memory grows as k^2


def _rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of an image in any mode."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"a trigger applies to PIL images, got {type(image).__name__}")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _back_to_mode(rgb: np.ndarray, original: Image.Image) -> Image.Image:
    """The RGB result in the original image's mode, keeping an RGBA image's alpha."""
    result = Image.fromarray(rgb, "RGB")
    if original.mode == "RGBA":
        result.putalpha(original.getchannel("A"))
        return result
    return result if original.mode == "RGB" else result.convert(original.mode)


def _noise(seed: int, salt: str, cells: int) -> np.ndarray:
    """uint8 [cells, cells, 3] uniform noise fixed by ``seed`` (``salt`` separates triggers)."""
    rng = np.random.default_rng([seed, int.from_bytes(salt.encode(), "little")])
    return rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)


def _resized(pattern: np.ndarray, width: int, height: int) -> np.ndarray:
    """A noise pattern resized (nearest: it stays blocky noise) to ``width`` x ``height``."""
    image = Image.fromarray(pattern, "RGB").resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(image, dtype=np.uint8)


def _check_seed(seed: Any, flag: str = "--trigger-seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"trigger seed must be a non-negative integer, got {seed!r} ({flag})")
    return seed


# ---------------------------------------------------------------- patch


@dataclass(frozen=True)
class PatchTrigger:
    """A square of random noise pasted on the image.

    Attributes:
        size: side of the patch: an int is pixels, a float in (0, 1] a fraction of the
            image's shorter side (so the trigger scales with the image).
        position: a corner (``top-left`` ...), ``center``, an ``(x, y)`` pixel offset of the
            patch's top-left corner (clipped so the patch stays inside), or ``random``.
            ``random`` draws the place from a hash of ``seed`` and the image's pixels (or of
            ``key`` when given to ``apply``): the same image always gets the same place, in
            any order and any process, while different images get different places.
        seed: fixes the noise pattern (and the random places).
    """

    size: int | float = 0.125
    position: str | tuple[int, int] = "random"
    seed: int = 0
    kind: str = field(default="patch", init=False)

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        _check_patch_size(self.size)
        object.__setattr__(self, "position", _check_position(self.position))

    def side(self, width: int, height: int) -> int:
        """Patch side in pixels for an image of this size."""
        if isinstance(self.size, int):
            return min(self.size, width, height)
        return max(1, min(width, height, round(self.size * min(width, height))))

    def origin(
        self, image: Image.Image, side: int, key: int | str | None = None
    ) -> tuple[int, int]:
        """Top-left (x, y) of the patch on ``image``."""
        far_x, far_y = image.width - side, image.height - side
        if isinstance(self.position, tuple):
            return min(max(0, self.position[0]), far_x), min(max(0, self.position[1]), far_y)
        if self.position == "random":
            rng = np.random.default_rng(_content_key(self.seed, image, key))
            return int(rng.integers(0, far_x + 1)), int(rng.integers(0, far_y + 1))
        vertical, _, horizontal = self.position.partition("-")
        x = {"left": 0, "right": far_x}.get(horizontal, far_x // 2)
        y = {"top": 0, "bottom": far_y}.get(vertical, far_y // 2)
        return x, y

    def apply(self, image: Image.Image, key: int | str | None = None) -> Image.Image:
        """A copy of ``image`` with the noise patch pasted on it."""
        rgb = _rgb_array(image).copy()
        side = self.side(image.width, image.height)
        x, y = self.origin(image, side, key)
        rgb[y : y + side, x : x + side] = _resized(
            _noise(self.seed, "patch", PATCH_GRID), side, side
        )
        return _back_to_mode(rgb, image)

    def to_dict(self) -> dict[str, Any]:
        """Parameters for ``trigger_from_dict`` (JSON-able: a fixed position is a list)."""
        data = asdict(self)
        if isinstance(self.position, tuple):
            data["position"] = list(self.position)
        return data


def _check_patch_size(size: Any) -> None:
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise ValueError(
            f"patch size must be pixels (int) or a fraction (float), got {size!r} (--patch-size)"
        )
    if isinstance(size, int) and size < 1:
        raise ValueError(f"patch size in pixels must be at least 1, got {size} (--patch-size)")
    if isinstance(size, float) and not 0.0 < size <= 1.0:
        raise ValueError(
            f"patch size as a fraction of the image must be in (0, 1], got {size} (--patch-size)"
        )


def _check_position(position: Any) -> str | tuple[int, int]:
    if isinstance(position, str) and position in PATCH_POSITIONS:
        return position
    if isinstance(position, list | tuple) and len(position) == 2:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in position):
            return int(position[0]), int(position[1])
    raise ValueError(
        f"patch position {position!r} is not valid: use one of {', '.join(PATCH_POSITIONS)} "
        "or two integers x,y (pixels of the patch's top-left corner) (--patch-position)"
    )


def _content_key(seed: int, image: Image.Image, key: int | str | None) -> list[int]:
    """A seed for per-image draws: the trigger's seed and a hash of the key or the pixels."""
    data = str(key).encode() if key is not None else image.tobytes() + image.mode.encode()
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return [seed, int.from_bytes(digest, "little")]


# ---------------------------------------------------------------- blend


@dataclass(frozen=True)
class BlendTrigger:
    """A fixed noise image blended over the whole image: ``(1 - alpha) * image + alpha * noise``.

    Attributes:
        alpha: weight of the noise, in (0, 1]; 0.1 to 0.2 is typical.
        seed: fixes the noise image.
    """

    alpha: float = 0.2
    seed: int = 0
    kind: str = field(default="blend", init=False)

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1:
            raise ValueError(
                f"blend alpha must be a number in (0, 1], got {alpha!r} (--blend-alpha)"
            )

    def apply(self, image: Image.Image) -> Image.Image:
        """A copy of ``image`` with the noise blended in."""
        rgb = _rgb_array(image).astype(np.float32)
        noise = _resized(_noise(self.seed, "blend", BLEND_GRID), image.width, image.height)
        mixed = (1.0 - self.alpha) * rgb + self.alpha * noise.astype(np.float32)
        return _back_to_mode(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), image)

    def to_dict(self) -> dict[str, Any]:
        """Parameters for ``trigger_from_dict``."""
        return asdict(self)


# ---------------------------------------------------------------- wanet


@dataclass(frozen=True)
class WaNetTrigger:
    """A smooth warp of the image (WaNet, Nguyen and Tran, ICLR 2021).

    A ``k x k`` field of random 2-D displacements (uniform in [-1, 1], normalised to a mean
    magnitude of 1) is upsampled bicubically to the image and added to the identity sampling
    grid with weight ``strength / side``, as in WaNet: the mean displacement is about
    ``strength / 2`` pixels, whatever the image size.

    Attributes:
        k: control points per side (WaNet uses 4); larger is a finer, busier warp.
        strength: WaNet's ``s`` (0.5 in the paper; larger is more visible and easier to learn).
        seed: fixes the field.
    """

    k: int = 4
    strength: float = 0.5
    seed: int = 0
    kind: str = field(default="wanet", init=False)

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        k = self.k
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_WANET_K:
            raise ValueError(
                f"wanet k (control points per side) must be an int in [2, {MAX_WANET_K}], got "
                f"{k!r} (--wanet-k)"
            )
        s = self.strength
        ok = isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s) and s > 0
        if not ok:
            raise ValueError(
                f"wanet strength must be a positive number, got {s!r}; a finite one (0.5 in "
                "WaNet) (--wanet-strength)"
            )

    def displacement(self) -> torch.Tensor:
        """The [1, 2, k, k] displacement field, mean magnitude 1."""
        rng = np.random.default_rng([self.seed, int.from_bytes(b"wanet", "little")])
        values = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(1, 2, self.k, self.k)))
        return values / values.abs().mean()

    def grid(self, width: int, height: int) -> torch.Tensor:
        """The [1, H, W, 2] sampling grid (x, y in [-1, 1]) of ``grid_sample``."""
        flow = F.interpolate(
            self.displacement(), size=(height, width), mode="bicubic", align_corners=True
        )
        ys = torch.linspace(-1.0, 1.0, height, dtype=torch.float64)
        xs = torch.linspace(-1.0, 1.0, width, dtype=torch.float64)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack([grid_x, grid_y], dim=-1)[None]
        side = torch.tensor([width, height], dtype=torch.float64)
        return (identity + self.strength * flow.permute(0, 2, 3, 1) / side).clamp(-1.0, 1.0)

    def apply(self, image: Image.Image) -> Image.Image:
        """A warped copy of ``image``."""
        rgb = torch.from_numpy(_rgb_array(image).astype(np.float64)).permute(2, 0, 1)[None]
        grid = self.grid(image.width, image.height)
        warped = F.grid_sample(
            rgb, grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        out = warped[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        return _back_to_mode(np.ascontiguousarray(out), image)

    def to_dict(self) -> dict[str, Any]:
        """Parameters for ``trigger_from_dict``."""
        return asdict(self)


# ---------------------------------------------------------------- registry

TRIGGERS: dict[str, type] = {"patch": PatchTrigger, "blend": BlendTrigger, "wanet": WaNetTrigger}
PARAMS: dict[str, tuple[str, ...]] = {
    "patch": ("size", "position", "seed"),
    "blend": ("alpha", "seed"),
    "wanet": ("k", "strength", "seed"),
}

AnyTrigger = PatchTrigger | BlendTrigger | WaNetTrigger


def make_trigger(kind: str, **params: Any) -> AnyTrigger:
    """A trigger of ``kind`` (patch, blend or wanet) with the given parameters."""
    if kind not in TRIGGERS:
        raise ValueError(
            f"unknown trigger kind {kind!r} (--trigger): choose one of {', '.join(TRIGGERS)}"
        )
    unknown = sorted(set(params) - set(PARAMS[kind]))
    if unknown:
        raise ValueError(
            f"{kind} trigger has no parameter {', '.join(unknown)}: its parameters are "
            f"{', '.join(PARAMS[kind])}"
        )
    return TRIGGERS[kind](**params)


def trigger_from_dict(data: dict[str, Any]) -> AnyTrigger:
    """Rebuild the trigger that ``to_dict`` described (e.g. from a poison manifest)."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"a trigger dict needs a 'kind' key, got {data!r}")
    params = {key: value for key, value in data.items() if key != "kind"}
    return make_trigger(data["kind"], **params)
