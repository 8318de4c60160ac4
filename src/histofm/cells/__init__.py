"""Cells: nucleus instance segmentation (HoVer-Net formulation on a ViT + UNETR decoder), metrics, GeoJSON.

* :mod:`~histofm.cells.hovernet`: targets (NP, HV, TP), loss, the model;
* :mod:`~histofm.cells.postprocess`: HV maps to instances, and a classical baseline;
* :mod:`~histofm.cells.metrics`: Dice, AJI, PQ, mPQ, bootstrap;
* :mod:`~histofm.cells.train`: training on the bundled HGSC field, checkpoints;
* :mod:`~histofm.cells.infer`: tiled prediction over images and slides;
* :mod:`~histofm.cells.geojson`: QuPath detections.
"""
