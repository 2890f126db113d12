"""The notebooks' logic, importable and tested, so that notebooks stay a few lines per cell.

``data`` (records, patches, coverage; no GUI imports), ``plots`` (matplotlib), ``widgets``
(ipywidgets forms), ``views`` (napari layers), ``napari_widget`` (the napari dock widget) and
``runner`` (executes a notebook with injected parameters, for tests and batch runs), ``planning``
(notebook 03's planner form), ``runs`` (notebook 04's run launcher and live plot) and ``evaluation``
(notebook 05's predictions, score table and error labels).
"""
