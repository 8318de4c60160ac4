"""Beyond histopathology: reading radiology images (DICOM) for the same models and methods."""

from histofm.medical.dicom import CT_WINDOWS, DicomImage, apply_window, read_dicom, to_rgb_slices

__all__ = ["CT_WINDOWS", "DicomImage", "apply_window", "read_dicom", "to_rgb_slices"]
