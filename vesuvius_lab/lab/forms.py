"""The box every notebook form sits in: live, it is a plain VBox; as a saved copy it says so.

JupyterLab saves the widgets' state with the notebook (jupyterlab-overrides.json: saveState), so a
reopened notebook or a restarted kernel shows the forms as they were, but nothing behind them
answers. JupyterLab marks such views with the class ``jupyter-widgets-disconnected``; the form's
note is shown only then, and its controls are dimmed, so nobody presses a button that does nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as w

RECONNECT_TEXT = "A saved copy: the kernel behind this form is gone. Run this cell (Shift+Enter) to use it again."

_RECONNECT_HTML = (
    "<style>"
    ".vlab-reconnect{display:none}"
    ".jupyter-widgets-disconnected .vlab-reconnect{display:block;padding:4px 8px;margin:2px 0;"
    "border-left:4px solid #d9534f;background:var(--jp-layout-color2,#eee)}"
    ".vlab-form.jupyter-widgets-disconnected .widget-button,"
    ".vlab-form.jupyter-widgets-disconnected .widget-inline-hbox{opacity:0.5;pointer-events:none}"
    "</style>"
    f"<div class='vlab-reconnect'>{RECONNECT_TEXT}</div>"
)


def notebook_form(children: Sequence[w.Widget], css_class: str | None = None) -> w.VBox:
    """A notebook cell's form: ``children`` under a note that shows only when the form is a saved copy."""
    box = w.VBox([w.HTML(_RECONNECT_HTML), *children])
    box.add_class("vlab-form")
    if css_class:
        box.add_class(css_class)
    return box
