"""``python -m loratool`` and the ``loratool`` console script.

Ctrl-C is one line and exit 130 from the first instant: until the CLI is imported (when a
KeyboardInterrupt would be a traceback from the middle of some import) SIGINT ends the
process at once; there is nothing to clean up yet. From then on it is a KeyboardInterrupt,
so every ``finally`` (temporary files, rollbacks) runs on the way out.
"""

import os
import signal


def _interrupted_early(signum, frame) -> None:
    os.write(2, b"error: interrupted\n")
    os._exit(130)


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
        signal.signal(signal.SIGINT, signal.default_int_handler)
    main()


if __name__ == "__main__":
    run()
