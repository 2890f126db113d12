"""The Qt event loop in a notebook kernel, for napari: ``%gui qt`` that also runs unattended.

ipykernel's Qt loop sleeps until the shell socket's file descriptor signals a message. That
descriptor is edge-triggered: an edge consumed before the loop starts is not signalled again, so
the next request waits for some later message. Run by hand this goes unnoticed; run unattended
(nbconvert, papermill, Run All) the notebook hangs at a random cell (ipykernel#559, nbclient#97:
seen here with nbconvert on notebook 02). ``start_qt`` adds a 50 ms check for pending messages to
the kernel's Qt loop, which leaves it as ipykernel's own notifier does.
"""

from __future__ import annotations

CHECK_MS = 50


def start_qt() -> None:
    """Enable the Qt event loop in this kernel (what ``%gui qt`` does), hang-free; outside a
    kernel (plain IPython, scripts) it only enables the loop."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return
    shell.enable_gui("qt")
    kernel = getattr(shell, "kernel", None)
    if kernel is None or getattr(kernel, "_vlab_qt_check", None) is not None:
        return
    from ipykernel.eventloops import get_shell_stream
    from IPython.external.qt_for_kernel import QtCore

    stream = get_shell_stream(kernel)

    def check() -> None:
        # only while the kernel idles in its Qt loop, never inside a cell that processes Qt events
        if getattr(kernel.app, "_in_event_loop", False) and stream.flush(limit=1):
            kernel._qt_notifier.setEnabled(False)
            kernel.app.qt_event_loop.quit()

    timer = QtCore.QTimer(kernel.app)
    timer.timeout.connect(check)
    timer.start(CHECK_MS)
    kernel._vlab_qt_check = timer
