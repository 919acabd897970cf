"""Seeded synthetic clips from scikit-image's bundled photographs (no download), with captions.

Each clip looks at a photograph through a moving camera (pan, zoom, roll, or still) and composites 0-2
moving sprites (coloured discs and squares) on top. Its caption says what moves and where, e.g.
"the camera pans left over the coffee photo; a red disc moves down".

Conventions (one place for them; evaluation code reads :class:`ClipSpec`, not the words):

* Directions of sprites are **screen directions** (y grows downwards): "moves down" = +y.
* Camera captions describe the **camera**, as in film: when the camera pans left the photo content
  slides **right** across the frame. ``ClipSpec.scene_shift`` is that in-frame content motion in
  pixels per frame (+x right, +y down); ``PAN_SCENE_SHIFT`` maps a pan direction to its sign.
* A camera that rolls clockwise makes the content turn counter-clockwise on screen;
  ``ClipSpec.scene_rotation`` is the on-screen content rotation in degrees per frame
  (positive = clockwise). A zoom "in" enlarges the content (``scene_zoom`` > 1 per frame).

Motion is moderate (over a clip the camera travels about 7-22 % of the frame and sprites 18-37 %), in
the range of ordinary footage at 16 fps; the photograph is mirrored and tinted per clip (a random
left-right flip and a per-channel gain of 0.75-1.25) so that ten training photographs give many
distinct scenes and a model must copy its content frame rather than remember the photographs.

Split: held-out clips use photographs and sprite colours that training clips never contain, so an
evaluation on ``split="heldout"`` sees content the model never saw. Item ``i`` of a dataset with a
given seed and split is always the same clip (its random numbers are keyed by (seed, split, i)).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .transforms import CLIP_FRAMES, DatasetError, parse_size

# skimage.data name -> the noun used in captions. Only photographs that ship inside scikit-image.
PHOTOS = {
    "astronaut": "astronaut", "coffee": "coffee", "camera": "cameraman", "immunohistochemistry": "tissue",
    "hubble_deep_field": "galaxy", "moon": "moon", "coins": "coins", "brick": "brick", "grass": "grass",
    "gravel": "gravel", "chelsea": "cat", "rocket": "rocket", "clock": "clock",
}
HELD_OUT_PHOTOS = ("chelsea", "rocket", "clock")
COLOURS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
    "white": (0.97, 0.97, 0.97), "cyan": (0.1, 0.9, 0.9), "orange": (1.0, 0.55, 0.05),
}
HELD_OUT_COLOURS = ("cyan", "orange")
SHAPES = ("disc", "square")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
# in-frame content motion of a camera pan (film convention: pan left -> content slides right)
PAN_SCENE_SHIFT = {name: (-dx, -dy) for name, (dx, dy) in DIRECTIONS.items()}
CAMERA_MOTIONS = ("pan", "zoom", "roll", "still")
CAMERA_PROBABILITIES = (0.5, 0.2, 0.15, 0.15)
SPRITE_COUNT_PROBABILITIES = (0.2, 0.5, 0.3)      # 0, 1, 2 sprites
SPLITS = {"train": 1, "heldout": 2, "all": 3}
# motion ranges, as fractions of the frame's short side per frame (pan, sprites), per-frame scale
# change (zoom) and degrees per frame (roll)
PAN_SPEED = (0.005, 0.015)
SPRITE_SPEED = (0.012, 0.025)
ZOOM_RATE = (0.006, 0.015)
ROLL_RATE = (0.4, 1.0)
TINT = (0.75, 1.25)


@dataclass
class SpriteSpec:
    colour: str
    shape: str
    direction: str
    radius: float                   # pixels
    start: tuple[float, float]      # centre (x, y) at frame 0, pixels
    velocity: tuple[float, float]   # pixels per frame, screen coordinates

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction}"


@dataclass
class ClipSpec:
    """Everything that defines one clip; ``render`` turns it into frames."""
    index: int
    photo: str
    camera: str                      # pan / zoom / roll / still
    direction: str | None            # pan: left/right/up/down; zoom: in/out; roll: clockwise/counterclockwise
    size: tuple[int, int]
    view: float                      # photo pixels per output pixel at frame 0
    centre: tuple[float, float]      # photo coordinates of the frame centre at frame 0
    scene_shift: tuple[float, float] = (0.0, 0.0)   # in-frame content motion, pixels per frame
    scene_zoom: float = 1.0          # in-frame content scale factor per frame
    scene_rotation: float = 0.0      # in-frame content rotation, degrees per frame (clockwise > 0)
    sprites: list[SpriteSpec] = field(default_factory=list)
    flip: bool = False               # the photograph mirrored left-right before filming
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)   # per-channel gain applied to the photograph

    def caption(self) -> str:
        noun = PHOTOS[self.photo]
        camera = {
            "pan": f"the camera pans {self.direction} over the {noun} photo",
            "zoom": f"the camera zooms {self.direction} on the {noun} photo",
            "roll": f"the camera rolls {self.direction} over the {noun} photo",
            "still": f"a still view of the {noun} photo",
        }[self.camera]
        return "; ".join([camera] + [s.caption() for s in self.sprites])

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=None)
def load_photo(name: str) -> torch.Tensor:
    """A bundled scikit-image photograph as float32 [3, H, W] in [0, 1] (grey photos repeated to RGB)."""
    if name not in PHOTOS:
        raise DatasetError(f"unknown photo {name!r}; choose from {sorted(PHOTOS)}")
    try:
        import skimage.data
    except ImportError:
        raise DatasetError("synthetic clips need scikit-image: pip install 'reducio-fastattn[train]' "
                           "(or pip install scikit-image)") from None
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float()
    return image / (255.0 if image.max() > 1.5 else 1.0)


class SyntheticClips(Dataset):
    """``count`` seeded clips of ``size`` (int or (H, W)) from the ``split`` photos and colours."""

    def __init__(self, split: str = "train", size=64, count: int = 10000, seed: int = 0,
                 frames: int = CLIP_FRAMES):
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if count < 1:
            raise DatasetError(f"count must be >= 1, got {count}")
        self.split, self.size, self.count, self.seed, self.frames = split, parse_size(size), int(count), int(seed), frames
        held_photos, held_colours = set(HELD_OUT_PHOTOS), set(HELD_OUT_COLOURS)
        pick = {"train": lambda held: not held, "heldout": lambda held: held, "all": lambda held: True}[split]
        self.photos = [p for p in PHOTOS if pick(p in held_photos)]
        self.colours = [c for c in COLOURS if pick(c in held_colours)]

    def __len__(self) -> int:
        return self.count

    def describe(self) -> dict:
        return {"kind": "synthetic", "split": self.split, "size": list(self.size), "count": self.count,
                "seed": self.seed, "frames": self.frames}

    # ------------------------------------------------------------------ sampling the parameters
    def spec(self, index: int) -> ClipSpec:
        if not 0 <= index < self.count:
            raise IndexError(f"clip {index} out of range 0..{self.count - 1}")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        height, width = self.size
        photo = self.photos[int(rng.integers(len(self.photos)))]
        _, photo_h, photo_w = load_photo(photo).shape
        camera = str(rng.choice(CAMERA_MOTIONS, p=CAMERA_PROBABILITIES))
        # the frame covers 45-80 % of the photo's short side
        view = float(rng.uniform(0.45, 0.8)) * min(photo_h / height, photo_w / width)
        spec = ClipSpec(index=index, photo=photo, camera=camera, direction=None, size=(height, width), view=view,
                        centre=(0.0, 0.0))
        travel = (0.0, 0.0)
        if camera == "pan":
            spec.direction = str(rng.choice(list(DIRECTIONS)))
            speed = float(rng.uniform(PAN_SPEED[0], PAN_SPEED[1])) * min(height, width)   # output px per frame
            sx, sy = PAN_SCENE_SHIFT[spec.direction]
            spec.scene_shift = (sx * speed, sy * speed)
            travel = (abs(sx) * speed * view * (self.frames - 1), abs(sy) * speed * view * (self.frames - 1))
        elif camera == "zoom":
            spec.direction = str(rng.choice(["in", "out"]))
            rate = float(rng.uniform(ZOOM_RATE[0], ZOOM_RATE[1]))
            spec.scene_zoom = math.exp(rate if spec.direction == "in" else -rate)
        elif camera == "roll":
            spec.direction = str(rng.choice(["clockwise", "counterclockwise"]))
            rate = float(rng.uniform(ROLL_RATE[0], ROLL_RATE[1]))
            spec.scene_rotation = -rate if spec.direction == "clockwise" else rate
        # centre so that the camera path stays inside the photo where possible (reflection covers the rest)
        half_w, half_h = width * view / 2 + travel[0] / 2, height * view / 2 + travel[1] / 2
        cx = float(rng.uniform(min(half_w, photo_w / 2), max(photo_w - half_w, photo_w / 2)))
        cy = float(rng.uniform(min(half_h, photo_h / 2), max(photo_h - half_h, photo_h / 2)))
        # start the camera so that its path is centred on (cx, cy)
        spec.centre = (cx + spec.scene_shift[0] * view * (self.frames - 1) / 2,
                       cy + spec.scene_shift[1] * view * (self.frames - 1) / 2)
        n_sprites = int(rng.choice(len(SPRITE_COUNT_PROBABILITIES), p=SPRITE_COUNT_PROBABILITIES))
        for _ in range(n_sprites):
            spec.sprites.append(self._sprite(rng))
        spec.flip = bool(rng.random() < 0.5)
        spec.tint = tuple(float(g) for g in rng.uniform(TINT[0], TINT[1], size=3))
        return spec

    def _sprite(self, rng: np.random.Generator) -> SpriteSpec:
        height, width = self.size
        radius = float(rng.uniform(0.08, 0.13)) * min(height, width)
        direction = str(rng.choice(list(DIRECTIONS)))
        dx, dy = DIRECTIONS[direction]
        speed = float(rng.uniform(SPRITE_SPEED[0], SPRITE_SPEED[1])) * min(height, width)
        travel = speed * (self.frames - 1)

        def start(extent: float, d: float) -> float:
            low, high = radius, extent - radius
            if d > 0:
                high = max(low, high - travel)
            elif d < 0:
                low = min(high, low + travel)
            return float(rng.uniform(low, high))

        return SpriteSpec(colour=str(rng.choice(self.colours)), shape=str(rng.choice(SHAPES)), direction=direction,
                          radius=radius, start=(start(width, dx), start(height, dy)),
                          velocity=(dx * speed, dy * speed))

    # ------------------------------------------------------------------ rendering
    def render(self, spec: ClipSpec) -> torch.Tensor:
        """``[3, T, H, W]`` float32 in [-1, 1]."""
        height, width = spec.size
        photo = load_photo(spec.photo)
        if spec.flip:
            photo = photo.flip(-1)
        photo = (photo * torch.tensor(spec.tint, dtype=torch.float32).reshape(3, 1, 1)).clamp(0, 1)
        # pre-shrink the photo (antialiased) so bilinear sampling does not alias: ~1.25 photo px per output px
        shrink = min(1.0, 1.25 / spec.view)
        if shrink < 1.0:
            new = (max(2, round(photo.shape[1] * shrink)), max(2, round(photo.shape[2] * shrink)))
            photo = F.interpolate(photo[None], size=new, mode="bilinear", antialias=True, align_corners=False)[0]
        scale_x, scale_y = photo.shape[2] / load_photo(spec.photo).shape[2], photo.shape[1] / load_photo(spec.photo).shape[1]
        photo_h, photo_w = photo.shape[1:]
        px, py = self._photo_points(spec)
        grid = torch.stack([px * scale_x / photo_w * 2 - 1, py * scale_y / photo_h * 2 - 1], dim=-1).float()
        frames = F.grid_sample(photo[None].expand(self.frames, -1, -1, -1), grid, mode="bilinear",
                               padding_mode="reflection", align_corners=False)          # [T, 3, H, W]
        return (composite_sprites(frames, spec).clamp(0, 1) * 2 - 1).permute(1, 0, 2, 3).contiguous()

    def camera_flow(self, spec: ClipSpec, content_index: int = 7) -> torch.Tensor:
        """The camera's exact motion as a backward flow ``[2, T, H, W]`` (dx, dy) in pixels: frame t at
        (x, y) shows what the frame ``content_index`` shows at (x + dx, y + dy), sprites aside (the
        convention of ``reducio.vae.blocks.warp_frames``). For evaluation: what a decoder that knew the
        camera exactly could do with the content frame."""
        height, width = spec.size
        px, py = self._photo_points(spec)
        cx = spec.centre[0] - spec.scene_shift[0] * spec.view * content_index
        cy = spec.centre[1] - spec.scene_shift[1] * spec.view * content_index
        view = spec.view / spec.scene_zoom ** content_index
        angle = math.radians(-spec.scene_rotation * content_index)
        dx, dy = (px - cx) / view, (py - cy) / view
        # invert the content frame's rotation: offsets from its centre in its own pixels
        gx = math.cos(angle) * dx - math.sin(angle) * dy
        gy = math.sin(angle) * dx + math.cos(angle) * dy
        ys = torch.arange(height, dtype=torch.float64) + 0.5 - height / 2
        xs = torch.arange(width, dtype=torch.float64) + 0.5 - width / 2
        return torch.stack([gx - xs[None, None, :], gy - ys[None, :, None]]).float()

    def _photo_points(self, spec: ClipSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each output pixel of each frame looks in the photograph: (x, y) ``[T, H, W]`` float64."""
        height, width = spec.size
        t = torch.arange(self.frames, dtype=torch.float64)
        ys = torch.arange(height, dtype=torch.float64) + 0.5 - height / 2
        xs = torch.arange(width, dtype=torch.float64) + 0.5 - width / 2
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")                       # output offsets from the centre
        # content zoom z per frame => the camera's view shrinks by z; content rotation r => camera turns by -r
        view = spec.view / spec.scene_zoom ** t                              # photo px per output px
        angle = torch.deg2rad(-spec.scene_rotation * t)
        cx = spec.centre[0] - spec.scene_shift[0] * spec.view * t
        cy = spec.centre[1] - spec.scene_shift[1] * spec.view * t
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
        # rotating the sampling grid by -r turns the content on screen by +r
        px = cx[:, None, None] + view[:, None, None] * (cos * gx + sin * gy)
        py = cy[:, None, None] + view[:, None, None] * (-sin * gx + cos * gy)
        return px, py

    def __getitem__(self, key) -> dict:
        # keys may be (index, epoch) from the training sampler: the synthetic clips are fixed, so the
        # epoch does not change them (like re-reading the same files)
        index = int(key if isinstance(key, (int, np.integer)) else key[0])
        spec = self.spec(index)
        return {"video": self.render(spec), "caption": spec.caption(), "index": index, "skipped": 0}


def sprite_alpha(sprite: SpriteSpec, size: tuple[int, int], frames: int) -> torch.Tensor:
    """How much of each pixel the sprite covers in each frame: ``[T, 1, H, W]`` in [0, 1] (a 1-pixel
    antialiased edge)."""
    height, width = size
    pix_y = (torch.arange(height, dtype=torch.float32) + 0.5)[None, :, None]
    pix_x = (torch.arange(width, dtype=torch.float32) + 0.5)[None, None, :]
    tt = torch.arange(frames, dtype=torch.float32)[:, None, None]
    ox = pix_x - (sprite.start[0] + sprite.velocity[0] * tt)
    oy = pix_y - (sprite.start[1] + sprite.velocity[1] * tt)
    if sprite.shape == "disc":
        distance = torch.sqrt(ox * ox + oy * oy) - sprite.radius
    else:
        distance = torch.maximum(ox.abs(), oy.abs()) - sprite.radius
    return (0.5 - distance).clamp(0, 1)[:, None]


def composite_sprites(frames: torch.Tensor, spec: ClipSpec) -> torch.Tensor:
    """``frames`` [T, 3, H, W] in [0, 1] with the clip's sprites painted on top, in their order."""
    for sprite in spec.sprites:
        alpha = sprite_alpha(sprite, spec.size, frames.shape[0])
        colour = torch.tensor(COLOURS[sprite.colour], dtype=torch.float32).reshape(1, 3, 1, 1)
        frames = frames * (1 - alpha) + colour * alpha
    return frames
