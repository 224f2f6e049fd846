"""Classical Chinese poetry: forms, rhyme tables, tonal patterns, constrained decoding, reports.

    from atelier.poetry import compose, check, revise, PoemError, FORMS
    out = compose(model, tokenizer, form="qijue", acrostic="春夏秋冬", seed=1)
    check("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")["compliant"]  # True
"""

from atelier.poetry.checker import check
from atelier.poetry.compose import SearchConfig, compose, poem_constraints_from_extra_body, revise, suggest
from atelier.poetry.errors import PoemError
from atelier.poetry.forms import FORMS, form_catalog

__all__ = ["compose", "check", "revise", "suggest", "poem_constraints_from_extra_body", "PoemError", "FORMS", "form_catalog",
           "SearchConfig"]
