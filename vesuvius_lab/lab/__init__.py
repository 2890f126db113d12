"""The notebooks' logic, importable and tested, so that notebooks stay a few lines per cell.

``data`` (records, patches, coverage; no GUI imports), ``plots`` (matplotlib), ``widgets``
(ipywidgets forms), ``views`` (napari layers), ``napari_widget`` (the napari dock widget) and
``runner`` (executes a notebook with injected parameters, for tests and batch runs).
"""
