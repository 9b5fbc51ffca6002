"""User-facing errors: each says what was wrong and what to do. CLIs print them without a traceback. Also Ctrl-C
handling that never loses an interrupt (`catch_ctrl_c`, `ctrl_c_at_step_boundaries`)."""


class JaxconceptError(Exception):
    """Base class for errors caused by user input (bad files, names, settings)."""


class ModelSourceError(JaxconceptError):
    """A model source (folder, hub id, named config) that cannot be loaded."""


class ConceptTokenError(JaxconceptError):
    """A concept token or init word that cannot be used."""


class PromptError(JaxconceptError):
    """A prompt that the text encoder cannot take."""


class ShardingError(JaxconceptError):
    """A batch or mesh that does not fit the devices."""


class LayerGridError(JaxconceptError):
    """Attention maps asked for at a query-grid size where the model has no cross-attention layer."""


# ------------------------------------------------------------------------------------------ Ctrl-C

import contextlib  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

_CTRL_C: list = []  # the times of Ctrl-C (SIGINT) seen and not yet acted on
_DEFER = [False]  # True while training: the first Ctrl-C stops at the next step boundary


def _on_sigint(signum, frame) -> None:
    _CTRL_C.append(time.time())
    if _DEFER[0] and len(_CTRL_C) == 1:
        print("\nCtrl-C: stopping at the next step (again to stop at once)", file=sys.stderr, flush=True)
        return
    raise KeyboardInterrupt


def catch_ctrl_c() -> None:
    """For command lines, first thing: Ctrl-C raises KeyboardInterrupt as usual, and is also remembered, so that
    one raised where Python drops it (inside a garbage-collection callback such as XLA's `_xla_gc_callback`,
    "Exception ignored in ...") still stops the command at the next `raise_if_interrupted`."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
        previous = sys.unraisablehook

        def quiet_ctrl_c(info):  # the dropped KeyboardInterrupt is remembered and acted on: no "Exception ignored"
            if not isinstance(info.exc_value, KeyboardInterrupt):
                previous(info)

        sys.unraisablehook = quiet_ctrl_c


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if a Ctrl-C was seen and not acted on."""
    if _CTRL_C:
        raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_at_step_boundaries():
    """While training: the first Ctrl-C only asks to stop, and the loop stops at its next step boundary
    (`raise_if_interrupted` between steps), cleanly; a second one stops at once. A Ctrl-C seen before (and
    dropped) stops at the start. Signals are delivered to the main thread only: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _DEFER[0] = True
    try:
        raise_if_interrupted()
        yield
    finally:
        _DEFER[0] = False
        _CTRL_C.clear()
        signal.signal(signal.SIGINT, previous)
