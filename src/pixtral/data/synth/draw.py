"""Shared drawing helpers: image sizes, a canvas in "view" units, text, shapes, arrows.

The model looks at every image downscaled (aspect kept) so its longest side is at most
VIEW px. Layouts are therefore written in view units: a canvas whose longest side is
at most VIEW. A larger image is the same drawing scaled up by `Canvas.scale`, so after
the model's downscale every image shows text of the same size (TEXT px, about 15 px cap
height) whatever its pixel size. Only Pillow's built-in scalable font is used
(`ImageFont.load_default(size=...)`, Pillow >= 10.1), so rendering needs no font files
and is the same on every run.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from pixtral.data.synth.vocab import INK, WHITE

VIEW = 256  # longest side the model sees, in px
MIN_SIDE = 64  # image sides lie within MIN_SIDE..MAX_SIDE px
MAX_SIDE = 768
TEXT = 22  # font size (view px) of labels, values and words: cap height 15 px
TITLE = 26  # font size (view px) of titles

# The token grid (layout="grid"): the default model merges its 16-px patches 2x2, so each of its
# image tokens covers a CELL x CELL square of the view. A glyph drawn inside one cell is read from
# one token; a glyph that straddles cells, at a different offset in every image, the model reads
# far worse (research/scripts/aligned_glyph_grid_data.py: 96% of glyphs read after 2000 steps in cells,
# 5% at loose positions). In grid layouts every image is a whole number of cells each way at VIEW,
# and every label, value and object is centred in a cell (or a block of cells).
CELL = 32

Point = tuple[float, float]


@lru_cache(maxsize=64)
def font(px: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at `px` pixels."""
    loaded = ImageFont.load_default(size=px)
    if not isinstance(loaded, ImageFont.FreeTypeFont):  # Pillow < 10.1 or no FreeType
        raise RuntimeError("pixtral data synth needs Pillow >= 10.1 built with FreeType")
    return loaded


def _longest_and_log_ratio(rng: random.Random, lo: float, max_ratio: float, portrait_bias: float) -> tuple[float, float]:
    """A longest side log-uniform in lo..MAX_SIDE px, and log(width / height) uniform within
    +-log(max_ratio), shifted by -portrait_bias and clipped back into that range."""
    longest = math.exp(rng.uniform(math.log(lo), math.log(MAX_SIDE)))
    log_ratio = rng.uniform(-math.log(max_ratio), math.log(max_ratio)) - portrait_bias
    return longest, max(-math.log(max_ratio), min(math.log(max_ratio), log_ratio))


def sample_size(
    rng: random.Random,
    min_view: tuple[float, float],
    max_ratio: float,
    portrait_bias: float = 0.0,
    fits: Callable[[float, float], bool] | None = None,
) -> tuple[int, int]:
    """Draw an image size (width, height) in px for one category.

    The longest side is log-uniform up to MAX_SIDE, the aspect ratio log-uniform within
    1/max_ratio..max_ratio (shifted towards portrait by `portrait_bias`, in log units).
    A size is kept when, seen at VIEW, it is at least `min_view` (width, height) and
    `fits(view_w, view_h)` holds: layouts are sized for their largest content, so the
    size says nothing about the answers.
    """
    lo = max(MIN_SIDE, *min_view)
    for _ in range(1000):
        longest, log_ratio = _longest_and_log_ratio(rng, lo, max_ratio, portrait_bias)
        ratio = math.exp(log_ratio)
        if ratio >= 1:
            width, height = round(longest), round(longest / ratio)
        else:
            width, height = round(longest * ratio), round(longest)
        if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
            continue
        shrink = min(1.0, VIEW / max(width, height))
        view_w, view_h = width * shrink, height * shrink
        if view_w >= min_view[0] and view_h >= min_view[1] and (fits is None or fits(view_w, view_h)):
            return width, height
    raise RuntimeError(f"no image size fits min_view={min_view}, max_ratio={max_ratio}")


def sample_grid_size(
    rng: random.Random,
    min_view: tuple[float, float],
    max_ratio: float,
    portrait_bias: float = 0.0,
    fits: Callable[[float, float], bool] | None = None,
) -> tuple[int, int]:
    """`sample_size` for grid layouts: seen at VIEW, the image is a whole number of CELLs each way.

    The longest side is log-uniform up to MAX_SIDE as in `sample_size`. An image longer than VIEW
    is seen VIEW long: its pixel size is the view size times a scale, with the longest side rounded
    up and the other down, so that the model's resize (longest side to VIEW, each side up to whole
    patches) lands exactly on the cells.
    """
    lo = max(MIN_SIDE, *min_view)
    max_cells, min_cells = VIEW // CELL, MIN_SIDE // CELL
    for _ in range(1000):
        longest, log_ratio = _longest_and_log_ratio(rng, lo, max_ratio, portrait_bias)
        long_cells = max_cells if longest >= VIEW else max(min_cells, round(longest / CELL))
        short_cells = max(min_cells, min(long_cells, round(long_cells / math.exp(abs(log_ratio)))))
        cols, rows = (long_cells, short_cells) if log_ratio >= 0 else (short_cells, long_cells)
        view_w, view_h = cols * CELL, rows * CELL
        if view_w < min_view[0] or view_h < min_view[1] or (fits is not None and not fits(view_w, view_h)):
            continue
        scale = max(1.0, longest / VIEW)
        if scale == 1.0:
            return view_w, view_h
        longer = math.ceil(VIEW * scale)
        if view_w >= view_h:
            return longer, min(longer, math.floor(view_h * scale))
        return min(longer, math.floor(view_w * scale)), longer
    raise RuntimeError(f"no grid image size fits min_view={min_view}, max_ratio={max_ratio}")


def cell_centre(v: float) -> float:
    """The centre of the grid cell (CELL view px) that holds `v`."""
    return (math.floor(v / CELL) + 0.5) * CELL


def ink_for(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `fill`."""
    r, g, b = fill
    return INK if 0.299 * r + 0.587 * g + 0.114 * b > 150 else WHITE


class Canvas:
    """A white RGB image drawn in view units (see the module docstring)."""

    def __init__(self, width: int, height: int):
        self.image = Image.new("RGB", (width, height), WHITE)
        self._draw = ImageDraw.Draw(self.image)
        self.scale = max(1.0, max(width, height) / VIEW)  # px per view unit
        self.w = width / self.scale  # size in view units
        self.h = height / self.scale

    # -- coordinates -------------------------------------------------------------------
    def _px(self, v: float) -> int:
        return round(v * self.scale)

    def _pts(self, points: Sequence[Point]) -> list[tuple[int, int]]:
        return [(self._px(x), self._px(y)) for x, y in points]

    def _width(self, w: float) -> int:
        return max(1, round(w * self.scale))

    # -- primitives --------------------------------------------------------------------
    def rect(self, x0: float, y0: float, x1: float, y1: float, fill=None, outline=None, width: float = 2) -> None:
        box = [self._px(x0), self._px(y0), max(self._px(x0), self._px(x1) - 1), max(self._px(y0), self._px(y1) - 1)]
        self._draw.rectangle(box, fill=fill, outline=outline, width=self._width(width) if outline else 0)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float | None = None, fill=None, outline=None, width: float = 2) -> None:
        ry = rx if ry is None else ry
        box = [self._px(cx - rx), self._px(cy - ry), self._px(cx + rx), self._px(cy + ry)]
        self._draw.ellipse(box, fill=fill, outline=outline, width=self._width(width) if outline else 0)

    def polygon(self, points: Sequence[Point], fill=None, outline=None, width: float = 2) -> None:
        self._draw.polygon(self._pts(points), fill=fill, outline=outline, width=self._width(width) if outline else 0)

    def line(self, points: Sequence[Point], fill=INK, width: float = 2, joint: str | None = None) -> None:
        self._draw.line(self._pts(points), fill=fill, width=self._width(width), joint=joint)

    # -- text --------------------------------------------------------------------------
    def text_width(self, text: str, size: float = TEXT) -> float:
        """Advance width of `text` in view units."""
        px = self._width(size)
        return font(px).getlength(text) / self.scale

    def text(self, x: float, cy: float, text: str, size: float = TEXT, fill=INK, align: str = "center",
             box: tuple[int, int, int] | None = None) -> tuple[float, float, float, float]:
        """Draw one line of text whose capital letters are vertically centred on `cy`.

        `align` says whether `x` is the left edge, centre or right edge. With `box`, a
        rectangle of that colour is drawn behind the text first. Returns the text's box
        (x0, y0, x1, y1) in view units.
        """
        px = self._width(size)
        f = font(px)
        width = f.getlength(text) / self.scale
        cap_top, cap_bottom = f.getbbox("H", anchor="ls")[1::2]
        cap = (cap_bottom - cap_top) / self.scale
        x0 = {"left": x, "center": x - width / 2, "right": x - width}[align]
        baseline = cy + cap / 2
        bounds = (x0, cy - cap / 2, x0 + width, baseline)
        if box is not None:
            pad = 2.5
            self.rect(bounds[0] - pad, bounds[1] - pad - 1, bounds[2] + pad, bounds[3] + pad + 1, fill=box)
        self._draw.text((self._px(x0), self._px(baseline)), text, font=f, fill=fill, anchor="ls")
        return bounds

    # -- composite shapes --------------------------------------------------------------
    def shape(self, kind: str, cx: float, cy: float, r: float, fill) -> None:
        """A filled circle, square, triangle or star of about radius `r`, centred on (cx, cy).

        Triangles and stars are centred on their incircle so that a label drawn at
        (cx, cy) sits inside them.
        """
        if kind == "circle":
            self.ellipse(cx, cy, r, fill=fill)
        elif kind == "square":
            s = 0.88 * r
            self.rect(cx - s, cy - s, cx + s, cy + s, fill=fill)
        elif kind == "triangle":
            R = 1.25 * r  # circumradius; the centroid (= incircle centre) is at (cx, cy)
            self.polygon([(cx + R * math.cos(a), cy + R * math.sin(a))
                          for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)], fill=fill)
        elif kind == "star":
            outer, inner = 1.2 * r, 0.6 * r
            pts = []
            for i in range(10):
                rad = outer if i % 2 == 0 else inner
                a = -math.pi / 2 + i * math.pi / 5
                pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
            self.polygon(pts, fill=fill)
        else:
            raise ValueError(f"unknown shape {kind!r}")

    @staticmethod
    def shape_extent(kind: str, r: float, angle: float) -> float:
        """Distance from the centre of `shape(kind, ..., r)` to its edge in direction
        `angle` (radians, y down). Stars count as their convex hull."""
        if kind == "circle":
            return r
        if kind == "square":
            return 0.88 * r / max(abs(math.cos(angle)), abs(math.sin(angle)))
        if kind == "triangle":
            apothem, normals = 0.625 * r, (-math.pi / 6, math.pi / 2, 7 * math.pi / 6)
        elif kind == "star":
            apothem, normals = 1.2 * r * math.cos(math.pi / 5), [-0.3 * math.pi + k * 0.4 * math.pi for k in range(5)]
        else:
            raise ValueError(f"unknown shape {kind!r}")
        return apothem / max(math.cos(angle - n) for n in normals)

    def arrow(self, start: Point, end: Point, fill=INK, width: float = 3, head: float = 11) -> None:
        """A straight arrow from `start` to `end` (the tip)."""
        (x0, y0), (x1, y1) = start, end
        length = math.hypot(x1 - x0, y1 - y0)
        ux, uy = (x1 - x0) / length, (y1 - y0) / length
        base = (x1 - ux * head, y1 - uy * head)
        self.line([start, base], fill=fill, width=width)
        half = 0.6 * head
        self.polygon([(x1, y1), (base[0] - uy * half, base[1] + ux * half),
                      (base[0] + uy * half, base[1] - ux * half)], fill=fill)
