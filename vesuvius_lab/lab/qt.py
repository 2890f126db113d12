"""The Qt event loop in a notebook kernel, for napari: ``%gui qt`` that also runs unattended, and
``on_qt_thread`` for the widget callbacks that change a viewer from another thread.

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

import functools
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import ParamSpec, TypeVar

from vesuvius_lab.errors import VLabError

CHECK_MS = 50
QT_CALL_TIMEOUT_S = 300.0  # a widget callback waits this long for the Qt thread (a busy cell) before failing
P, R = ParamSpec("P"), TypeVar("R")


def _private_runtime_dir() -> None:
    """Qt wants $XDG_RUNTIME_DIR (a private folder) and warns in every napari cell without it."""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="vlab-runtime-")  # mode 0700


def on_qt_thread(func: Callable[P, R]) -> Callable[P, R]:
    """Run ``func`` on the Qt (main) thread and return its result there or here.

    JupyterLab 4.4+ with ipykernel 7 handles widget messages in a kernel subshell, a thread of
    its own: an ipywidgets callback that touches napari from there races the Qt thread's painting
    (seen as napari's layer list painting a removed row, then a segfault that kills the kernel
    when notebook 01 switched records in 3D). Called on the main thread it runs at once; from
    another thread it is queued to the Qt loop, and its exception is raised in the caller.
    """

    @functools.wraps(func)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if threading.current_thread() is threading.main_thread():
            return func(*args, **kwargs)
        from superqt.utils import ensure_main_thread

        done: Future = Future()

        def run() -> None:
            try:
                done.set_result(func(*args, **kwargs))
            except BaseException as exc:  # handed to the calling thread, never raised inside a Qt slot
                done.set_exception(exc)

        ensure_main_thread(run)()
        try:
            return done.result(timeout=QT_CALL_TIMEOUT_S)
        except TimeoutError:
            raise VLabError(f"{func.__name__}: the Qt thread did not answer in {QT_CALL_TIMEOUT_S:.0f} s "
                            "(a cell is still running, or start_qt() was not run before napari)") from None

    return call


def start_qt() -> None:
    """Enable the Qt event loop in this kernel (what ``%gui qt`` does), hang-free; outside a
    kernel (plain IPython, scripts) it only enables the loop."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return
    _private_runtime_dir()
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
