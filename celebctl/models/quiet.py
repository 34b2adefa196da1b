"""Keeping the libraries quiet: the core never prints, so transformers' and diffusers' logging
and progress bars are silenced while they load or run."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_libraries(include_diffusers: bool = True):
    """Silence transformers/diffusers logging and progress bars for a block (core never prints)."""
    import warnings

    import transformers.utils.logging as tlog

    loggers = [tlog]
    if include_diffusers:
        import diffusers.utils.logging as dlog

        loggers.append(dlog)
    saved = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in loggers]
    try:
        for log in loggers:
            log.set_verbosity(log.ERROR)
            log.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, verbosity, bars in saved:
            log.set_verbosity(verbosity)
            if bars:
                log.enable_progress_bar()
