"""Beyond histopathology: reading radiology images (DICOM) for the same models and methods."""

from histofm.medical.dicom import CT_WINDOWS, DicomImage, apply_window, read_dicom, to_rgb_slices
from histofm.medical.modality import (
    CropConfig,
    PretrainConfig,
    file_folds,
    modality_benchmark,
    modality_crops,
)

__all__ = [
    "CT_WINDOWS",
    "CropConfig",
    "DicomImage",
    "PretrainConfig",
    "apply_window",
    "file_folds",
    "modality_benchmark",
    "modality_crops",
    "read_dicom",
    "to_rgb_slices",
]
