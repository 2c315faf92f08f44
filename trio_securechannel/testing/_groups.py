"""Exception groups, taken apart: a test should see the error itself, not trio's wrapping."""

from __future__ import annotations

import sys

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """Every exception in ``group``, however nested."""
    found: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            found.append(exc)
    return found


def alone(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error in ``group`` (cancellations beside it left out), or the group."""
    found = leaves(group)
    errors = [exc for exc in found if not isinstance(exc, trio.Cancelled)] or found
    return errors[0] if len(errors) == 1 else group
