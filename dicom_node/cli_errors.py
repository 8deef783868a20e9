"""The one error the command line raises for bad input: one readable line on stderr, exit status 2."""

from __future__ import annotations

from typing import IO, Any

import click

__all__ = ["UsageFailure"]


class UsageFailure(click.ClickException):
    """One readable line on stderr, exit status 2."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"dicomnode: {self.format_message()}", err=True)
