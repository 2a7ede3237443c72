"""Progress bars (tqdm) that stay quiet when output is not a terminal unless asked for."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
             **kwargs) -> tqdm:
    """A tqdm bar on stderr with rate and ETA; ``disable`` for library use and tests."""
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, mininterval=0.5, **kwargs)


def format_eta(seconds: float) -> str:
    """H:MM:SS (or D days, H:MM:SS) as tqdm shows times."""
    days, rest = divmod(int(seconds), 86400)
    return (f"{days}d " if days else "") + tqdm.format_interval(rest)
