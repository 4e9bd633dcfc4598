"""How the one-line errors of every command summarise an exception raised by a library."""

from __future__ import annotations


def describe(error: BaseException, with_type: bool = True, limit: int = 200) -> str:
    """`Type: first line of the message`, or just the first line; the type alone when the message
    is empty (some libraries raise bare StopIteration or KeyError)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0][:limit]}" if with_type else lines[0][:limit]
