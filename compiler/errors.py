"""The one error type a user sees. The CLI prints it and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: bad spec, infeasible budget, unwritable output, edited repo.

    `where` is "file:line:column" when known, `field` the spec path (e.g. "search.layers.min"),
    `fix` one sentence saying what would work.
    """

    def __init__(self, message: str, *, where: str | None = None, field: str | None = None,
                 fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.field = field
        self.fix = fix

    def render(self) -> str:
        head = f"{self.where}: " if self.where else ""
        field = f"{self.field}: " if self.field else ""
        text = f"error: {head}{field}{self.message}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text
