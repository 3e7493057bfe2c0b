"""Prompt rules (`rules:` in a job or serve config): what a prompt must and must not say,
and the brand style every prompt gets.

Checked where requests are validated, before any engine sees them: a manifest row that
breaks a rule goes to the errors table (stage `rules`, field `prompt`, the rule in the
reason) and the job goes on; an online request gets a 400 naming the field and the rule.
A passing prompt then gets the style suffix (and the negative prompt its suffix), so the
metadata row, the fingerprint and the result cache all see the prompt as made.

Terms match whole words, case-insensitively ("gun" does not match "begun"); patterns are
Python regular expressions searched case-insensitively.
"""

from __future__ import annotations

import functools
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .schema import FieldError, ImageRequest


class PromptRules(BaseModel):
    """Rules every prompt of a job or deployment is held to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    required_terms: tuple[str, ...] = Field(
        (), description="Words or phrases every prompt must hold."
    )
    forbidden_terms: tuple[str, ...] = Field((), description="Words or phrases no prompt may hold.")
    required_patterns: tuple[str, ...] = Field(
        (), description="Regular expressions every prompt must match."
    )
    forbidden_patterns: tuple[str, ...] = Field(
        (), description="Regular expressions no prompt may match."
    )
    style_suffix: str | None = Field(
        None, max_length=500, description="Appended to every prompt that passes (', ' between)."
    )
    negative_suffix: str | None = Field(
        None, max_length=500, description="Appended to every negative prompt (', ' between)."
    )

    @field_validator("required_patterns", "forbidden_patterns")
    @classmethod
    def _check_patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"item {i}: {pattern!r} is not a regular expression ({exc})"
                ) from None
        return v

    @property
    def active(self) -> bool:
        return self != NO_RULES


NO_RULES = PromptRules()


class RuleBroken(FieldError):
    """A request refused by a prompt rule (the errors table's stage `rules`, not `validate`)."""


class LayersRefused(FieldError):
    """A request the job's composite layers cannot take (a template column it lacks),
    found before its image is made (the errors table's stage `composite`)."""


def error_stage(errors: list[FieldError]) -> str:
    """The errors-table stage of a refused row's errors: rules, composite or validate."""
    if isinstance(errors[0], RuleBroken):
        return "rules"
    return "composite" if isinstance(errors[0], LayersRefused) else "validate"


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str, term: bool) -> re.Pattern:
    source = rf"(?<!\w){re.escape(pattern)}(?!\w)" if term else pattern
    return re.compile(source, re.IGNORECASE)


def broken_rule(prompt: str, rules: PromptRules) -> str | None:
    """The first rule `prompt` breaks, said in words, or None."""
    for kind, items, term, must in (
        ("forbidden_terms", rules.forbidden_terms, True, False),
        ("forbidden_patterns", rules.forbidden_patterns, False, False),
        ("required_terms", rules.required_terms, True, True),
        ("required_patterns", rules.required_patterns, False, True),
    ):  # fmt: skip
        for item in items:
            found = _compiled(item, term).search(prompt) is not None
            if found and not must:
                return f"breaks rules.{kind}: {item!r} is not allowed"
            if must and not found:
                return f"breaks rules.{kind}: must contain {item!r}"
    return None


def apply_rules(request: ImageRequest, rules: PromptRules,
                field: str = "prompt") -> ImageRequest | RuleBroken:  # fmt: skip
    """`request` with the style suffixes, or the RuleBroken (naming `field`) of the rule
    its prompt breaks."""
    if not rules.active:
        return request
    broken = broken_rule(request.prompt, rules)
    if broken is not None:
        return RuleBroken(field=field, reason=broken)
    update = {}
    if rules.style_suffix:
        update["prompt"] = f"{request.prompt}, {rules.style_suffix}"
    if rules.negative_suffix:
        negative = request.negative_prompt
        update["negative_prompt"] = (
            f"{negative}, {rules.negative_suffix}" if negative else rules.negative_suffix
        )
    return request.model_copy(update=update) if update else request
