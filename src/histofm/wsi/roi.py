"""GeoJSON annotations (as QuPath exports them) as tissue or region-of-interest masks.

QuPath's *Export objects as GeoJSON* writes a ``FeatureCollection`` (or, in older
versions, a bare list of ``Feature`` objects); each annotation is a ``Polygon`` or
``MultiPolygon`` in level-0 pixels with its class in ``properties.classification.name``
(unclassified annotations have no ``classification``). :class:`RoiFilter` turns such a
file into a boolean mask on the tissue-mask grid:

* the *region* is the union of the polygons whose class is in ``include`` (every class
  when ``include`` is empty), minus the polygons whose class is in ``exclude``; a file with
  only excluded classes (``--roi-exclude Pen,Necrosis`` and nothing else) means "the whole
  slide minus those";
* as a region of interest (default) it is intersected with the detected tissue;
  with ``as_tissue`` it *is* the tissue mask (detection is ignored).

Holes (interior rings) are honoured. Other geometry types (points, lines) are ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from histofm.errors import HistofmError
from histofm.wsi.tissue import TissueMask

UNCLASSIFIED = "Unclassified"  # the name QuPath shows for annotations without a class


@dataclass(frozen=True)
class Annotation:
    """One annotation: polygons (each a list of rings ``(K, 2)`` in level-0 ``(x, y)``) and a class."""

    polygons: list[list[np.ndarray]]
    name: str = UNCLASSIFIED


def _class_name(props: Any) -> str:
    if not isinstance(props, dict):
        return UNCLASSIFIED
    cls = props.get("classification")
    if isinstance(cls, dict) and cls.get("name"):
        return str(cls["name"])
    if isinstance(cls, str) and cls:
        return cls
    return UNCLASSIFIED


def _rings(coords: Any, path: Path) -> list[np.ndarray]:
    try:
        rings = [np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in coords]
    except (TypeError, ValueError):
        raise HistofmError(f"{path.name} has a polygon whose coordinates are not [x, y] pairs; export it again from QuPath.") from None
    return [r for r in rings if len(r) >= 3]


def read_annotations(path: str | os.PathLike[str]) -> list[Annotation]:
    """Polygon annotations of a GeoJSON file (``FeatureCollection``, list of features or one feature)."""
    path = Path(path)
    if not path.is_file():
        raise HistofmError(f"Annotation file not found: {path}; fix --roi.")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HistofmError(f"{path.name} is not valid GeoJSON ({e.__class__.__name__}); export the annotations again.") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features", [])
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, list):
        features = doc
    else:
        raise HistofmError(f"{path.name} is not a GeoJSON FeatureCollection or list of features; fix --roi.")
    out = []
    for feat in features:
        if not isinstance(feat, dict):
            continue
        geom = feat.get("geometry") or {}
        kind, coords = geom.get("type"), geom.get("coordinates")
        if kind == "Polygon":
            polygons = [_rings(coords, path)]
        elif kind == "MultiPolygon":
            polygons = [_rings(p, path) for p in coords]
        else:
            continue
        polygons = [p for p in polygons if p]
        if polygons:
            out.append(Annotation(polygons, _class_name(feat.get("properties"))))
    return out


def _split(classes: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    if classes is None:
        return ()
    if isinstance(classes, str):
        classes = classes.split(",")
    return tuple(c.strip() for c in classes if c.strip())


def rasterize(annotations: list[Annotation], shape: tuple[int, int], downsample: tuple[float, float]) -> np.ndarray:
    """``(h, w)`` bool: True where a mask pixel's centre lies inside the annotations (holes excluded)."""
    h, w = shape
    image = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(image)
    sx, sy = downsample
    for ann in annotations:
        for rings in ann.polygons:
            # Mask pixel i spans level-0 [i * sx, (i + 1) * sx); PIL fills the integer points inside a
            # polygon, so shift by half a pixel to test each pixel's centre.
            scaled = [[(float(x) / sx - 0.5, float(y) / sy - 0.5) for x, y in ring] for ring in rings]
            draw.polygon(scaled[0], fill=1)
            for hole in scaled[1:]:
                draw.polygon(hole, fill=0)
    return np.asarray(image, dtype=bool)


@dataclass(frozen=True)
class RoiFilter:
    """A GeoJSON file (or a folder of ``<slide>.geojson``) used as a region of interest or tissue mask.

    Attributes:
        path: a ``.geojson`` / ``.json`` file, or a folder holding ``<slide name>.geojson`` per slide.
        include: classes that make up the region (empty: every class not excluded).
        exclude: classes removed from the region.
        as_tissue: the region is the tissue mask (default: the region restricts detected tissue).
    """

    path: Path
    include: tuple[str, ...] = field(default=())
    exclude: tuple[str, ...] = field(default=())
    as_tissue: bool = False

    @classmethod
    def create(cls, path: str | os.PathLike[str] | None, include: Any = None, exclude: Any = None,
               as_tissue: bool = False) -> RoiFilter | None:
        """A filter from command-line values (``None`` without a path)."""
        if path is None:
            if include or exclude or as_tissue:
                raise HistofmError("--roi-include, --roi-exclude and --roi-as-tissue need --roi FILE_OR_DIR.")
            return None
        inc, exc = _split(include), _split(exclude)
        both = sorted(set(inc) & set(exc))
        if both:
            raise HistofmError(f"Class {both[0]!r} is both in --roi-include and --roi-exclude; keep it in one.")
        return cls(Path(path), inc, exc, as_tissue)

    def file_for(self, slide_name: str) -> Path:
        """The annotation file of a slide (``path`` itself, or ``path/<slide_name>.geojson``)."""
        if not self.path.is_dir():
            if not self.path.is_file():
                raise HistofmError(f"Annotation file or folder not found: {self.path}; fix --roi.")
            return self.path
        for suffix in (".geojson", ".json"):
            candidate = self.path / f"{slide_name}{suffix}"
            if candidate.is_file():
                return candidate
        raise HistofmError(f"No {slide_name}.geojson in {self.path}; add the slide's annotations or drop --roi.")

    def describe(self, slide_name: str) -> str:
        """What a feature file records: file name, its SHA-256 and the classes."""
        from histofm.weights import sha256_file

        file = self.file_for(slide_name)
        mode = "tissue" if self.as_tissue else "roi"
        return (f"{mode}:{file.name}:sha256={sha256_file(file)[:16]}:include={','.join(self.include)}"
                f":exclude={','.join(self.exclude)}")

    def region(self, slide_name: str, shape: tuple[int, int], downsample: tuple[float, float]) -> np.ndarray:
        """``(h, w)`` bool region on a mask grid of ``shape`` whose pixels span ``downsample`` level-0 pixels."""
        file = self.file_for(slide_name)
        annotations = read_annotations(file)
        present = sorted({a.name for a in annotations})
        missing = [c for c in self.include if c not in present]
        if missing:
            raise HistofmError(
                f"{file.name} has no annotation of class {missing[0]!r} (classes: {', '.join(present) or 'none'}); "
                "fix --roi-include."
            )
        keep = [a for a in annotations if a.name not in self.exclude and (not self.include or a.name in self.include)]
        drop = [a for a in annotations if a.name in self.exclude]
        if keep:
            region = rasterize(keep, shape, downsample)
        elif drop:  # only exclusions: the whole slide minus them
            region = np.ones(shape, dtype=bool)
        else:
            raise HistofmError(f"{file.name} holds no polygon annotations; export the regions from QuPath or drop --roi.")
        if drop:
            region &= ~rasterize(drop, shape, downsample)
        return region

    def apply(self, tissue: TissueMask, slide_name: str) -> TissueMask:
        """The tissue mask restricted to (or, with ``as_tissue``, replaced by) the region."""
        region = self.region(slide_name, tissue.mask.shape, tissue.downsample)
        mask = region if self.as_tissue else tissue.mask & region
        return TissueMask(mask=mask, downsample=tissue.downsample, slide_dimensions=tissue.slide_dimensions,
                          threshold=tissue.threshold, mpp=tissue.mpp)
