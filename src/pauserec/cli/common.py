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
