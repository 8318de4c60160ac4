"""Read DICOM images (X-ray, CT, MR, ultrasound) into arrays the histofm models accept.

Pathology encoders expect RGB tiles. Radiology images differ in three ways that
matter for transfer (see ``docs/beyond-histopathology.md``):

* **Units.** CT pixels become Hounsfield units through the modality LUT
  (``HU = stored * RescaleSlope + RescaleIntercept``); a *window* then maps a HU
  range to display grey levels: ``y = clip((HU - (c - w/2)) / w, 0, 1)`` for a
  window centre ``c`` and width ``w`` (soft tissue 40/400, lung -600/1500, bone
  400/1800, brain 40/80).
* **Polarity.** ``MONOCHROME1`` images (many radiographs) show low values as
  white: they are inverted so that bright always means dense.
* **Channels and volumes.** Grey images are repeated to three channels; colour
  images (palette, YBR) are converted to RGB; multi-frame files and volumes are
  returned as a stack of slices ``(S, H, W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histofm.errors import HistofmError

# A header that declares more decoded bytes than this is refused before decoding (a corrupt
# Rows / Columns / NumberOfFrames would otherwise make a decoder allocate terabytes).
MAX_DECODED_BYTES = 8 * 2**30

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


@dataclass
class DicomImage:
    """Pixels and the header facts needed to display them.

    Attributes:
        array: ``(S, H, W)`` float32 in modality units (Hounsfield units for CT) for
            grey images, or ``(S, H, W, 3)`` uint8 RGB for colour images.
        modality: DICOM Modality (``CT``, ``MR``, ``CR``, ``DX``, ``US`` ...).
        window: (centre, width) from the header, when it has one.
        path: the file it came from.
    """

    array: np.ndarray
    modality: str
    window: tuple[float, float] | None
    path: Path

    @property
    def is_color(self) -> bool:
        return self.array.ndim == 4

    @property
    def num_slices(self) -> int:
        return int(self.array.shape[0])


def _first(value: object) -> float | None:
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)  # type: ignore[index, arg-type]
    except (TypeError, ValueError, IndexError):
        return None


def _reason(e: BaseException) -> str:
    """A library's exception as a short single-line quote."""
    text = " ".join(str(e).split())
    text = text if len(text) <= 120 else text[:117].rstrip() + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_declared_size(ds: object, path: Path) -> None:
    """Refuse a header that declares more pixels than can be decoded in memory (before decoding)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)  # type: ignore[attr-defined]
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        nbytes = max(1, (int(getattr(ds, "BitsAllocated", 8) or 8) + 7) // 8)
    except Exception:  # missing or malformed: pydicom's decoder reports it
        return
    total = rows * cols * frames * samples * nbytes
    if total > MAX_DECODED_BYTES:
        raise HistofmError(
            f"{path} declares {frames} frame(s) of {cols} x {rows} pixels ({total / 2**30:.0f} GiB decoded), more than "
            f"histofm loads at once ({MAX_DECODED_BYTES / 2**30:.0f} GiB), so its header is probably corrupt."
        )


def read_dicom(path: str | Path) -> DicomImage:
    """Read one DICOM file (single or multi-frame) into a :class:`DicomImage`.

    Raises:
        HistofmError: missing, non-DICOM, truncated or corrupt file, no pixel data, a header that
            declares an implausibly large image, or pixels no installed decoder can read.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.is_file():
        raise HistofmError(f"DICOM file {path} does not exist.")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise HistofmError(f"{path} is not a DICOM file (no DICM preamble); check the path.") from None
    except Exception as e:
        raise HistofmError(
            f"{path} could not be parsed as DICOM ({_reason(e)}); it is probably truncated or corrupt, "
            "so copy or export it again."
        ) from None
    try:
        has_pixels = "PixelData" in ds or "FloatPixelData" in ds
    except Exception as e:  # pydicom parses elements lazily: a damaged one fails on first access
        raise HistofmError(f"{path} has a corrupt DICOM header ({_reason(e)}); copy or export it again.") from None
    if not has_pixels:
        if "Rows" in ds:  # an image header whose pixels never arrived: a copy that stopped early
            raise HistofmError(
                f"{path} describes an image but holds no pixel data, so it is probably truncated; copy or export it again."
            )
        raise HistofmError(f"{path} holds no image (no pixel data); it may be a structured report or a segmentation.")
    _check_declared_size(ds, path)
    try:
        pixels = ds.pixel_array
    except MemoryError:
        raise HistofmError(f"Decoding the pixels of {path} needs more memory than is available.") from None
    except Exception as e:
        raise HistofmError(
            f"Could not decode the pixels of {path} ({_reason(e)}); the file may be truncated or corrupt, "
            "or its compression may need an extra decoder such as pylibjpeg."
        ) from None
    try:
        return _to_image(ds, pixels, path)
    except HistofmError:
        raise
    except Exception as e:  # a damaged LUT, rescale or colour element
        raise HistofmError(
            f"{path} has pixels but a corrupt header element needed to display them ({_reason(e)}); "
            "copy or export it again."
        ) from None


def _to_image(ds: Any, pixels: np.ndarray, path: Path) -> DicomImage:
    """Apply the header's colour, modality and polarity rules to decoded ``pixels``."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    modality = str(getattr(ds, "Modality", "OT"))

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        rgb = (rgb / 257).astype(np.uint8) if rgb.dtype != np.uint8 else rgb  # 16-bit LUT entries
        array = rgb if frames > 1 else rgb[None]
        return DicomImage(array=array, modality=modality, window=None, path=path)
    if pixels.ndim == (4 if frames > 1 else 3) and pixels.shape[-1] == 3:
        # Colour: pydicom already converts YBR to RGB for the compressed syntaxes it decodes.
        if photometric.startswith("YBR") and not _already_rgb(ds):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        array = pixels.astype(np.uint8) if frames > 1 else pixels.astype(np.uint8)[None]
        return DicomImage(array=array, modality=modality, window=None, path=path)

    if _enhanced(ds) and "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:
        values = _enhanced_rescale(ds, pixels, frames)  # HU for enhanced CT
    else:
        values = apply_modality_lut(pixels, ds).astype(np.float32)  # HU for CT
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values  # bright = dense, as in MONOCHROME2
    if frames == 1 and values.ndim == 2:
        values = values[None]
    # Only a top-level window is used; an enhanced object's FrameVOILUTSequence window is not (yet):
    # such images are shown with each slice's percentile range (see to_rgb_slices).
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    usable = center is not None and width is not None and math.isfinite(center) and math.isfinite(width) and width > 0
    window = (center, width) if usable else None
    if window is not None and photometric == "MONOCHROME1":
        lo, hi = float(pixels.min()), float(pixels.max())
        window = (lo + hi - window[0], window[1])
    return DicomImage(array=values, modality=modality, window=window, path=path)


def _enhanced(ds: Any) -> bool:
    """An enhanced multi-frame object: per-frame attributes live in functional group sequences."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _frame_value(ds: Any, frame: int, sequence: str, keyword: str) -> Any:  # noqa: ANN401
    """``keyword`` inside ``sequence`` of frame ``frame``'s functional group, else of the shared group, else top level."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    groups = ([per_frame[frame]] if frame < len(per_frame) else []) + list(shared[:1])
    for group in groups:
        items = group.get(sequence) or []
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return ds.get(keyword)


def _enhanced_rescale(ds: Any, pixels: np.ndarray, frames: int) -> np.ndarray:
    """``stored * slope + intercept`` with each frame's Pixel Value Transformation (enhanced CT, MR, PET)."""
    stack = pixels[None] if frames == 1 and pixels.ndim == 2 else pixels
    out = np.empty(stack.shape, dtype=np.float32)
    for i in range(stack.shape[0]):
        slope = _first(_frame_value(ds, i, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _first(_frame_value(ds, i, "PixelValueTransformationSequence", "RescaleIntercept"))
        slope = 1.0 if slope is None or not math.isfinite(slope) else slope
        intercept = 0.0 if intercept is None or not math.isfinite(intercept) else intercept
        out[i] = stack[i].astype(np.float32) * slope + intercept
    return out  # (F, H, W)


def _already_rgb(ds: object) -> bool:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return bool(syntax is not None and syntax.is_compressed)


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map ``[center - width/2, center + width/2]`` linearly onto ``[0, 1]`` and clip."""
    if width <= 0:
        raise HistofmError(f"Window width must be positive, got {width}.")
    lo = center - width / 2.0
    return np.clip((values.astype(np.float32) - lo) / width, 0.0, 1.0)


def to_rgb_slices(image: DicomImage, window: str | tuple[float, float] | None = None) -> list[np.ndarray]:
    """Slices as ``(H, W, 3)`` uint8 RGB arrays ready for an image model.

    Args:
        image: a :class:`DicomImage`.
        window: a name from :data:`CT_WINDOWS`, an explicit ``(centre, width)``, or
            ``None`` for the header's window (else each slice's 0.5-99.5 percentile range).
    """
    if image.is_color:
        return [s for s in image.array]
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise HistofmError(f"Unknown window {window!r}; choose one of {', '.join(CT_WINDOWS)} or pass (centre, width).")
        window = CT_WINDOWS[window]
    window = window or image.window
    out = []
    for s in image.array:
        if window is not None:
            grey = apply_window(s, *window)
        else:
            lo, hi = np.percentile(s, [0.5, 99.5])
            grey = apply_window(s, (lo + hi) / 2.0, max(float(hi - lo), 1e-6))
        g8 = (grey * 255.0 + 0.5).astype(np.uint8)
        out.append(np.repeat(g8[..., None], 3, axis=-1))
    return out
