"""Every item's ad creative: a small picture of a dish, drawn from the world's hidden attributes.

What a picture shows, and so what an image model can learn from it:
    category     the dish's hue and shape (each category its own palette and outline)
    price level  the item's price against its category's: a larger plate and more garnish dots when dearer
    appeal       the shop's hidden appeal (which the true click model rewards): vivid, bright, contrasted and
                 glossy when high, dull and grey when low
and what it does not: per-item photo quality (the appeal a picture conveys varies around its shop's),
position, size, rotation and stripes of the layout, a background of random colour and texture, and pixel
noise. The image is informative, never a clean lookup of the attributes.

Drawn vectorised over chunks of images (per-pixel arrays [n, 64, 64] float32), deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from features.creatives import CREATIVE_SIZE, encode_png
from features.simulator.world import World

CHUNK = 64  # images drawn together: the per-pixel arrays stay in the CPU cache (512 at once: twice as slow)
SHAPES = 6  # disc, square, ring, tall ellipse, diamond, wide ellipse; category c is drawn as shape c % SHAPES
DOTS = 6  # garnish positions around a dish
LAYERS = 8  # background, its stripes, plate, dish, its second tone, its shading, garnish, gloss
DOT_RING, DOT_RADIUS = 0.62, 0.17  # where the dots sit and how big they are, in dish radii
_GOLDEN = 0.618034  # category hues spaced by the golden ratio: neighbours never look alike
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class _Params:
    """Per-image drawing parameters (arrays of one value per image; colours (n, 3) in [0, 1])."""

    shape: np.ndarray
    cx: np.ndarray  # dish centre, in [-1, 1] image coordinates
    cy: np.ndarray
    scale: np.ndarray  # dish radius
    angle: np.ndarray
    plate: np.ndarray  # plate radius / dish radius
    dots: np.ndarray  # garnish dots shown
    dish: np.ndarray  # main colour
    dish2: np.ndarray  # second tone of the dish's pattern
    garnish: np.ndarray
    plate_rgb: np.ndarray
    background: np.ndarray
    stripes: np.ndarray  # (n, 4): frequency x, frequency y, phase, amplitude
    pattern: np.ndarray  # (n, 2): frequency, phase of the dish's pattern
    gloss: np.ndarray  # highlight strength
    saturation: np.ndarray  # global colourfulness (1: as drawn, 0: grey)
    contrast: np.ndarray
    noise: np.ndarray  # pixel noise sd


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (each in [0, 1]) -> (n, 3) RGB."""
    h6 = (np.asarray(h) % 1.0) * 6.0
    k = (np.array([5.0, 3.0, 1.0]) + h6[:, None]) % 6.0
    return (v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _params(world: World, rng: np.random.Generator) -> _Params:
    n = world.item_shop.size
    shop = world.item_shop
    cat = world.shop_category[shop]
    # price level: log of the item's price against its category's, about -1..1
    level = np.clip(np.log(world.item_price / world.category_price[cat]) / 0.4, -2.0, 2.0)
    # the appeal this photo conveys: its shop's, blurred by photo-to-photo quality
    appeal = np.tanh(0.7 * (world.shop_appeal[shop] + rng.normal(0, 0.45, n)))  # in (-1, 1)

    hue = cat * _GOLDEN + rng.normal(0, 0.025, n)
    dish_sat = np.clip(0.6 + 0.3 * appeal + rng.normal(0, 0.08, n), 0.05, 1.0)
    dish_val = np.clip(0.72 + 0.18 * appeal + rng.normal(0, 0.06, n), 0.2, 1.0)
    plate_val = rng.uniform(0.78, 0.97, n)
    bg_val = rng.uniform(0.35, 0.95, n)
    return _Params(
        shape=cat % SHAPES,
        cx=rng.normal(0, 0.1, n), cy=rng.normal(0, 0.1, n),
        scale=np.clip(0.42 + 0.06 * level + rng.normal(0, 0.03, n), 0.25, 0.6),
        angle=rng.uniform(0, 2 * np.pi, n),
        plate=1.2 + 0.12 * np.clip(level, 0, None) + rng.uniform(0, 0.08, n),
        dots=np.clip(np.round(2.5 + 1.5 * level + rng.normal(0, 0.6, n)), 0, DOTS).astype(np.int64),
        dish=hsv_to_rgb(hue, dish_sat, dish_val),
        dish2=hsv_to_rgb(hue + 0.08, dish_sat * 0.8, dish_val * 0.85),
        garnish=hsv_to_rgb(hue + 0.5 + rng.normal(0, 0.05, n), np.clip(dish_sat + 0.1, 0, 1),
                           np.clip(dish_val + 0.1, 0, 1)),
        plate_rgb=hsv_to_rgb(rng.uniform(size=n), rng.uniform(0, 0.06, n), plate_val),
        background=hsv_to_rgb(rng.uniform(size=n), rng.uniform(0, 0.4, n), bg_val),
        stripes=np.stack([rng.uniform(-8, 8, n), rng.uniform(-8, 8, n), rng.uniform(0, 2 * np.pi, n),
                          rng.uniform(0, 0.12, n)], axis=1),
        pattern=np.stack([rng.uniform(3, 9, n), rng.uniform(0, 2 * np.pi, n)], axis=1),
        gloss=np.clip(0.45 * (appeal + 0.3) + rng.normal(0, 0.08, n), 0, 0.8),
        saturation=np.clip(0.9 + 0.35 * appeal + rng.normal(0, 0.08, n), 0.2, 1.4),
        contrast=np.clip(1.0 + 0.2 * appeal + rng.normal(0, 0.05, n), 0.6, 1.4),
        noise=rng.uniform(0.4, 1.6, n) / 255,  # small: any noise doubles the PNG size
    )


def _take(p: _Params, idx: slice) -> _Params:
    return _Params(**{k: v[idx] for k, v in vars(p).items()})


def _shape_distance(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Distance-like field of each image's outline in dish coordinates: < 1 inside the dish."""
    d = np.empty_like(u)
    for s in range(SHAPES):  # a loop over the few shapes, each vectorised over its images
        k = shape == s
        if not k.any():
            continue
        uk, vk = u[k], v[k]
        if s == 0:
            d[k] = np.sqrt(uk * uk + vk * vk)
        elif s == 1:
            d[k] = np.maximum(np.abs(uk), np.abs(vk)) * 1.15
        elif s == 2:  # a ring: the hole is outside the dish too
            r = np.sqrt(uk * uk + vk * vk)
            d[k] = np.where(r < 0.45, 2.0 - r, r)
        elif s == 3:
            d[k] = np.sqrt((uk / 0.65) ** 2 + vk * vk)
        elif s == 4:
            d[k] = (np.abs(uk) + np.abs(vk)) / 1.25
        else:
            d[k] = np.sqrt(uk * uk + (vk / 0.6) ** 2)
    return d


def _layer_weights(p: _Params, size: int) -> np.ndarray:
    """(n, LAYERS, size * size) float32: how much of each layer's colour every pixel shows (rows sum to 1).

    The picture is painted back to front: the background (striped with a darker tone), the plate, the dish
    (two tones, shaded towards black at its rim), the garnish dots, and a white gloss over them. Each is a
    coverage in [0, 1] (soft edges: a one-pixel ramp) of one flat colour per image, so every pixel is a
    convex mix of the image's few colours, and colour adjustments can be made to those colours instead.
    """
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = axis[None, :, None], axis[None, None, :]

    def col(a: np.ndarray) -> np.ndarray:  # per-image values, broadcast over pixels
        return np.asarray(a, dtype=np.float32)[:, None, None]

    # Every linear function of the pixel's position is a row term plus a column term, and a Gaussian spot
    # is a row factor times a column factor: computed on [n, 1, size] and [n, size, 1], each costs one
    # full-size operation instead of several.
    cos, sin, inv = col(np.cos(p.angle)), col(np.sin(p.angle)), col(1 / p.scale)
    dx, dy = x - col(p.cx), y - col(p.cy)
    u, v = dx * (cos * inv) + dy * (sin * inv), dy * (cos * inv) - dx * (sin * inv)  # dish coordinates
    r2 = dx * dx * inv**2 + dy * dy * inv**2
    radius = np.sqrt(r2)
    edge = col(p.scale * size / 2)  # pixels per dish radius: the ramps are one pixel wide

    fx, fy, phase, amp = (col(p.stripes[:, i]) for i in range(4))
    stripes = amp * (0.5 + 0.5 * (np.sin(fx * x + phase) * np.cos(fy * y) + np.cos(fx * x + phase) * np.sin(fy * y)))
    plate = np.clip((col(p.plate) - radius) * edge, 0, 1)
    dish = np.clip((1 - _shape_distance(p.shape, u, v)) * edge, 0, 1)
    k, phase = col(p.pattern[:, 0]), col(p.pattern[:, 1])
    along_x, along_y = k * dx * (cos * inv) + phase, k * dy * (sin * inv)  # k u + phase, split
    tone = 0.3 + 0.3 * (np.sin(along_x) * np.cos(along_y) + np.cos(along_x) * np.sin(along_y))  # second tone
    rim = 0.3 * np.minimum(r2, 1)  # darker towards the dish's rim
    # garnish: dots on a circle of radius DOT_RING at angles 2 pi j / DOTS, the first `dots` of them shown;
    # a pixel is nearest the dot j = round(phi / step), at distance^2 = r^2 + R^2 - 2 r R cos(phi - j step)
    step = 2 * np.pi / DOTS
    phi = np.arctan2(v, u)
    j = np.round(phi / step)
    near2 = r2 + DOT_RING**2 - 2 * DOT_RING * radius * np.cos(phi - j * step)
    shown = np.where(j < 0, j + DOTS, j) < col(p.dots)  # j is in -DOTS/2..DOTS/2
    dot = np.clip((DOT_RADIUS - np.sqrt(np.maximum(near2, 0))) * edge, 0, 1) * shown
    # the gloss: a spot at (-0.35, -0.35) in dish coordinates
    gx = col(p.cx + p.scale * 0.35 * (np.sin(p.angle) - np.cos(p.angle)))
    gy = col(p.cy - p.scale * 0.35 * (np.sin(p.angle) + np.cos(p.angle)))
    spread = inv**2 / 0.08
    gloss = (col(p.gloss) * np.exp(-(x - gx) ** 2 * spread)) * np.exp(-(y - gy) ** 2 * spread) * dish

    w = np.empty((p.shape.size, LAYERS, size, size), dtype=np.float32)  # layer-major: each write is contiguous
    under_gloss = 1 - gloss
    np.multiply(dot, under_gloss, out=w[:, 6])
    dish_w = dish * (under_gloss - w[:, 6])  # dish * (1 - dot) * (1 - gloss)
    plate_w = plate * (under_gloss - w[:, 6]) - plate * dish_w
    back_w = under_gloss - w[:, 6] - dish_w - plate_w
    np.multiply(back_w, 1 - stripes, out=w[:, 0])
    np.multiply(back_w, stripes, out=w[:, 1])
    w[:, 2] = plate_w
    np.multiply(dish_w, (1 - tone) * (1 - rim), out=w[:, 3])
    np.multiply(dish_w, tone * (1 - rim), out=w[:, 4])
    np.multiply(dish_w, rim, out=w[:, 5])
    w[:, 7] = gloss
    return w.reshape(-1, LAYERS, size * size)


def _layer_colours(p: _Params) -> np.ndarray:
    """(n, LAYERS, 3) float32: the layers' colours, in `_layer_weights`'s order, after the photo's overall
    colourfulness and contrast (both affine per image, so applying them to the colours of a convex mix is
    applying them to its pixels)."""
    n = p.shape.size
    black, white = np.zeros((n, 3), np.float32), np.ones((n, 3), np.float32)
    colours = np.stack([p.background, p.background * 0.75, p.plate_rgb, p.dish, p.dish2, black, p.garnish, white],
                       axis=1).astype(np.float32)
    grey = (colours @ _LUMA)[..., None]
    colours = grey + p.saturation[:, None, None] * (colours - grey)
    return (0.5 + p.contrast[:, None, None] * (colours - 0.5)).astype(np.float32)


def _draw(p: _Params, rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 [n, size, size, 3] images of one chunk: the layers mixed, then sensor noise."""
    img = np.matmul(_layer_colours(p).transpose(0, 2, 1), _layer_weights(p, size))  # (n, 3, pixels)
    # uniform noise of the same sd as a Gaussian's: a sixth of the cost to draw, and no one can tell
    noise = rng.random(img.shape, dtype=np.float32)
    noise -= 0.5
    noise *= (np.sqrt(12) * p.noise).astype(np.float32)[:, None, None]
    img += noise
    np.clip(img, 0, 1, out=img)
    img *= 255
    img += 0.5
    return img.astype(np.uint8).transpose(0, 2, 1).reshape(-1, size, size, 3)


def _painter(world: World, size: int, chunk: int) -> tuple[Callable[[int], np.ndarray], int]:
    """(paint, chunks): paint(k) draws the k-th chunk of `chunk` items. Each chunk's noise has a stream of
    its own, so chunks can be drawn in any order, or at once, with the same pixels."""
    seed = world.config.seed
    params = _params(world, np.random.default_rng([seed, 3]))
    n = world.item_shop.size

    def paint(k: int) -> np.ndarray:
        return _draw(_take(params, slice(k * chunk, (k + 1) * chunk)), np.random.default_rng([seed, 4, k]), size)

    return paint, -(-n // chunk)


def render_creatives(world: World, size: int = CREATIVE_SIZE, chunk: int = CHUNK) -> np.ndarray:
    """uint8 [items, size, size, 3]: every item's creative, in item order."""
    paint, chunks = _painter(world, size, chunk)
    return np.concatenate([paint(k) for k in range(chunks)]) if chunks else np.zeros((0, size, size, 3), np.uint8)


def creative_columns(world: World, threads: int = 2) -> dict[str, object]:
    """The creatives table's columns: one PNG per item (`render_creatives`' pictures). Chunks are drawn and
    encoded on `threads` threads: numpy and zlib release the GIL, so two cores take half the time."""
    paint, chunks = _painter(world, CREATIVE_SIZE, CHUNK)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="paint") as pool:
        blobs = [png for part in pool.map(lambda k: encode_png(paint(k)), range(chunks)) for png in part]
    n = len(blobs)
    return {"item_id": np.arange(1, n + 1), "image_png": blobs,
            "width": np.full(n, CREATIVE_SIZE, np.int16), "height": np.full(n, CREATIVE_SIZE, np.int16)}
