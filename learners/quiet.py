"""Library noise a user can do nothing about, silenced where recstream starts.

Each filter names one message of one library, so every other warning still shows:

- qpsolvers warns at import that no QP solver is installed. Only Avalanche's GEM
  plugin needs one, and recstream never uses GEM; the advice it prints installs
  solvers nothing here calls.
- Avalanche warns "No loggers specified" for every strategy built: recstream
  reports through its own log and Prometheus metrics, not Avalanche's loggers.
- transformers draws a "Loading weights" progress bar while a local model loads,
  which takes well under a second.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

WEIGHT_LOADING_BAR = "Loading weights"


def silence_library_warnings() -> None:
    """Ignore the two warnings above; call before the libraries are imported (the qpsolvers one
    fires at import)."""
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning, module="qpsolvers")
    warnings.filterwarnings("ignore", message="No loggers specified", category=UserWarning, module="avalanche")


@contextlib.contextmanager
def no_weight_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar off within this block; its other bars (downloads) stay."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:  # a transformers without the hook: the bar shows, nothing else changes
        yield
        return

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == WEIGHT_LOADING_BAR:
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    previous = set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)
