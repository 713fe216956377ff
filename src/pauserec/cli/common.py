"""Shared bits of the thin Typer CLIs: error mapping and console output."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from pauserec.errors import PauserecError

F = TypeVar("F", bound=Callable)
console = Console()
err_console = Console(stderr=True)


def handle_errors(fn: F) -> F:
    """Turn a ``PauserecError`` into a one-line message on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PauserecError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


# --kv-memory of the commands that serve (recommend, serve): Recommender.kv_memory
KV_MEMORY_HELP = ("Memory one search call's KV cache may take (e.g. 2GB): a batch runs in calls of fewer users where it "
                  "would take more; same results. auto: half the memory left once the engine is loaded; none: no limit.")


def kv_memory(text: str) -> int | str | None:
    """--kv-memory as Recommender takes it, a bad size refused before the engine loads."""
    from pauserec.runtime.memory import parse_size

    word = text.strip().lower()
    return None if word == "none" else "auto" if word == "auto" else parse_size(text)
