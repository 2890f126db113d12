"""The notebooks' logic, importable and tested, so that notebooks stay a few lines per cell.

``records`` (records, lazy volumes, predictions, sampled patches, coverage; no GUI imports), ``plots``
(matplotlib), ``widgets`` (ipywidgets forms), ``views`` (napari layers), ``napari_widget`` (the
napari dock widget), ``qt`` (the Qt event loop a notebook's napari needs), ``planning`` (notebook
03's planner form), ``runs`` (notebook 04's run launcher and live plot), ``forecast`` (notebook
04's forecast panel), ``live_panel`` and ``live_dock`` (the live prediction in notebook 04 and in
napari), ``evaluation`` (notebook 05's predictions, score table and error labels) and ``compare``
(notebook 06's runs side by side).

Imported in a notebook, it shows the project's own errors (bad input, missing files) as the one
line they are, as the command line does, instead of a traceback.
"""

import sys

from vesuvius_lab.errors import VLabError


def _one_line_errors() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def show(_shell, _etype, value, _tb, tb_offset=None):
        for line in value.lines:
            print(f"error: {line}", file=sys.stderr)

    shell.set_custom_exc((VLabError,), show)


_one_line_errors()
