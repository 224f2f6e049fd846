"""The one error type of the poetry engine.

`PoemError` is a `ValueError` that also says which request field was wrong (`param`) and
which HTTP status the API should answer with (`status`):
- 400: the request itself is bad (unknown form, acrostic of the wrong length, a rhyme
  group that cannot hold the acrostic, n too large, …). The tables alone show it.
- 422: the request is well formed but the constrained search found no compliant poem
  within its budget. Retrying with another seed may succeed.
"""

from __future__ import annotations


class PoemError(ValueError):
    def __init__(self, message: str, *, param: str, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status

    def __repr__(self) -> str:
        return f"PoemError({str(self)!r}, param={self.param!r}, status={self.status})"

