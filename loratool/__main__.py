"""``python -m loratool`` and the ``loratool`` console script.

Ctrl-C is one line and exit 130 from the first instant: until the CLI is imported (when a
KeyboardInterrupt would be a traceback from the middle of some import) SIGINT ends the
process at once; there is nothing to clean up yet. From then on it is a KeyboardInterrupt,
so every ``finally`` (temporary files, rollbacks) runs on the way out (``_interrupt``).
"""

import os
import signal


def _interrupted_early(signum, frame) -> None:
    os.write(2, b"error: interrupted\n")
    os._exit(130)


def _interrupt(signum, frame) -> None:
    """SIGINT once the CLI is loaded: a KeyboardInterrupt, so that every ``finally`` runs on the
    way out. Except in importlib's own frames: there it can be raised inside the weakref
    callback of a module lock, where CPython prints it as "Exception ignored … Traceback" and
    drops it. It is then put off by a millisecond (SIGALRM), until that frame has returned."""
    if frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        signal.signal(signal.SIGALRM, _interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.001)
        return
    raise KeyboardInterrupt


def install_interrupt_handler() -> None:
    """What Ctrl-C does once the CLI is imported (the console script and the tests' fork
    server both call this)."""
    signal.signal(signal.SIGINT, _interrupt)


def run() -> None:
    installed = False
    try:
        # a SIGINT the parent ignores (a background job, nohup) stays ignored
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupted_early)
            installed = True
    except ValueError:  # not the main thread: leave signals alone
        pass
    from .cli import main

    if installed:
        install_interrupt_handler()
    main()


if __name__ == "__main__":
    run()
