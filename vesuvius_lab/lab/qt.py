"""The Qt event loop in a notebook kernel, for napari: ``%gui qt`` that also runs unattended.

ipykernel runs its Qt loop inside its own asyncio loop and leaves it only when the shell socket's
file descriptor signals a message. Two things then wait for a message that may never come: a
message whose edge was consumed before the Qt loop started (the descriptor is edge-triggered),
and the kernel's own asyncio work (the rest of a cell's execution, its reply) scheduled just
before the Qt loop took over the thread (ipykernel#1202, #559, nbclient#97). Run by hand this
goes unnoticed, since the next keystroke sends a message; run unattended (nbconvert, papermill,
Run All) the notebook hangs at a random cell: seen here with nbconvert on notebook 02 and in CI
on notebook 05. ``start_qt`` leaves the Qt loop every 50 ms, after handing over a pending message
as ipykernel's notifier does, so neither waits longer than that; ipykernel re-enters it 1 ms later.
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
        if getattr(kernel.app, "_in_event_loop", False):
            stream.flush(limit=1)
            kernel._qt_notifier.setEnabled(False)
            kernel.app.qt_event_loop.quit()

    timer = QtCore.QTimer(kernel.app)
    timer.timeout.connect(check)
    timer.start(CHECK_MS)
    kernel._vlab_qt_check = timer
