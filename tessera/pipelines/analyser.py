"""Read a shapes-world picture back from pixels: which coloured shapes are where.

Used to score text -> image generation. Objects are saturated, backgrounds are muted greys,
so a saturation threshold separates them; connected components are objects; the colour is
the nearest palette colour of the component's median; the shape comes from how much of the
bounding box it fills (square ~1, circle ~0.79, triangle and diamond ~0.5) and where its
widest row is (a triangle's at the bottom, a diamond's in the middle); the position is the
3x3 cell of the centroid. Its own accuracy on real rendered images is measured by eval
before it is trusted with generated ones.
"""

from __future__ import annotations

import numpy as np

from tessera.pipelines import shapes

_PALETTE = np.array(list(shapes.COLOURS.values()), dtype=np.float64)
_NAMES = list(shapes.COLOURS)


def analyse(image: np.ndarray, min_area_frac: float = 0.004, saturation: int = 70) -> list[shapes.ShapeObject]:
    """uint8 RGB (R, R, 3) -> detected objects (shape, colour, size, position), largest first."""
    from scipy import ndimage

    img = image.astype(np.int16)
    R = img.shape[0]
    sat = img.max(-1) - img.min(-1)
    mask = ndimage.binary_opening(sat > saturation, iterations=1)
    labels, n = ndimage.label(mask)
    found = []
    cell = R / 3.0
    for k in range(1, n + 1):
        comp = labels == k
        area = int(comp.sum())
        if area < min_area_frac * R * R:
            continue
        ys, xs = np.nonzero(comp)
        colour = _NAMES[int(np.argmin(((_PALETTE - np.median(image[comp], axis=0)) ** 2).sum(-1)))]
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        fill = area / float(h * w)
        widths = comp[ys.min():ys.max() + 1].sum(1)
        widest = float(np.mean(np.flatnonzero(widths >= widths.max() * 0.9))) / max(1, h - 1)
        if fill > 0.9:
            shape = "square"
        elif fill > 0.66:
            shape = "circle"
        else:
            shape = "triangle" if widest > 0.68 else "diamond"
        cy, cx = ys.mean(), xs.mean()
        row, col = min(2, int(cy // cell)), min(2, int(cx // cell))
        size = "large" if max(h, w) > 0.6 * cell else "small"
        found.append((area, shapes.ShapeObject(shape, colour, size, shapes.POSITIONS[row * 3 + col])))
    return [o for _, o in sorted(found, key=lambda t: -t[0])]


def matched(truth: list[shapes.ShapeObject], found: list[shapes.ShapeObject],
            key=lambda o: (o.colour, o.shape)) -> list[bool]:
    """For each true object, whether one of the found objects has its `key` (colour and shape unless
    told otherwise), each found object used at most once."""
    pool = [key(o) for o in found]
    hits = []
    for o in truth:
        hit = key(o) in pool
        if hit:
            pool.remove(key(o))
        hits.append(hit)
    return hits


def match_score(truth: list[shapes.ShapeObject], found: list[shapes.ShapeObject],
                key=lambda o: (o.colour, o.shape)) -> float:
    """Share of the true objects whose colour and shape (or `key`) appear among the found objects."""
    if not truth:
        return 1.0
    return sum(matched(truth, found, key)) / len(truth)
