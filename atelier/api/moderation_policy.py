"""The moderation policy on the generation routes (completions, chat, poems, image prompts):
ATELIER_MODERATION = off | flag | block.

  off    nothing is checked
  flag   inputs and outputs are checked; what is flagged is still served, and audited
  block  a flagged input is a 400 (code `content_filter`) before any model runs; a flagged output
         ends its choice with finish_reason "content_filter" and the text that tripped it is
         withheld — in a stream, as the choice's last chunk (OpenAI does the same)

Every decision is audited with its categories and where it was made, never the text itself.
The checker is the word-list moderator (atelier/safety/moderation.py): read what it cannot catch.
"""

from __future__ import annotations

from atelier.api.errors import APIError
from atelier.safety.moderation import Growing, Moderator, Result
from atelier.storage import audit

CONTENT_FILTER = "content_filter"


def flagged_categories(result: Result) -> list[str]:
    return [c for c, hit in result.categories.items() if hit]


def record(sessions, key_id: str | None, *, where: str, result: Result, blocked: bool) -> None:
    with sessions() as db:
        audit.record(db, action="moderation.block" if blocked else "moderation.flag", target=where, key_id=key_id,
                     detail={"categories": flagged_categories(result)})


def policy_for(settings, key) -> str:
    """The moderation policy for a request: the key's own (set by an admin), else ATELIER_MODERATION."""
    return getattr(key, "moderation", None) or settings.moderation


def check_input(moderator: Moderator, policy: str, texts: list[str], *, param: str, sessions, key_id: str | None,
                where: str) -> None:
    """Before a request runs: under `block`, a flagged text is a 400 naming `param`."""
    if policy == "off":
        return
    for text in texts:
        result = moderator.check(text)
        if result.flagged:
            blocked = policy == "block"
            record(sessions, key_id, where=f"{where}.input", result=result, blocked=blocked)
            if blocked:
                raise APIError(400, f"the {param} was flagged by this server's moderation "
                                    f"({', '.join(flagged_categories(result))}) and is refused",
                               param=param, code=CONTENT_FILTER)
            return


class OutputGuard:
    """Checks each choice's text as it grows; `allow(index, text_so_far)` says whether to serve it. Only
    the part added since the last call is checked (Moderator.growing), so a long stream costs no more
    per token than a short one."""

    def __init__(self, moderator: Moderator, policy: str, *, sessions, key_id: str | None, where: str):
        self.moderator, self.policy = moderator, policy
        self.sessions, self.key_id, self.where = sessions, key_id, where
        self.filtered: set[int] = set()  # choices cut off (block)
        self.flagged: set[int] = set()  # choices audited as flagged (flag or block)
        self._texts: dict[int, Growing] = {}

    def allow(self, index: int, text: str) -> bool:
        if index in self.filtered:
            return False
        if self.policy == "off" or index in self.flagged:  # flagged under `flag`: audited once, served
            return True
        growing = self._texts.setdefault(index, self.moderator.growing())
        result = growing.extend(text[growing.length:])
        if not result.flagged:
            return True
        blocked = self.policy == "block"
        self.flagged.add(index)
        record(self.sessions, self.key_id, where=f"{self.where}.output", result=result, blocked=blocked)
        if blocked:
            self.filtered.add(index)
        return not blocked
