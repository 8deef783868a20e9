"""Research commands (train / evaluate / predict); filled in by the ml work."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
