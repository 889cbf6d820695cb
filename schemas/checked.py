"""The base of every schema: a validation error that reads as cachekit's own.

pydantic's text names the field but not what it should be called, and ends each line with a link
to its documentation. A `Checked` model raises `ConfigError` instead (still a
`pydantic.ValidationError`, with the same `.errors()`): each wrong field on its own line with what
was given, an unknown field with the closest field the model takes and the list of them.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

import pydantic
from pydantic import BaseModel
from pydantic_core import PydanticCustomError

from cachekit.errors import CachekitError, shortened


class ConfigError(CachekitError, pydantic.ValidationError):
    """A config, spec or preset with wrong fields; `str()` says which and what is allowed."""

    explanation = ""

    def __str__(self) -> str:
        return self.explanation


class Checked(BaseModel):
    """Validation errors raised as `ConfigError`, explained against this model's fields."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ConfigError:
            raise
        except pydantic.ValidationError as error:
            raise explained(error, type(self), data) from None

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> typing.Self:
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ConfigError:
            raise
        except pydantic.ValidationError as error:
            raise explained(error, cls, obj) from None


def explained(error: pydantic.ValidationError, model: type[BaseModel], data: Any = None) -> ConfigError:
    """`error` as a `ConfigError` whose text explains each wrong field of `model` (given `data`)."""
    problems = error.errors(include_url=False)
    lines = [f"{len(problems)} invalid field{'s' * (len(problems) > 1)} for {error.title}"]
    for problem in problems:
        location = ".".join(str(part) for part in problem["loc"]) or "(the whole config)"
        lines += [location, f"  {_reason(problem, model, data)}"]
    details = [
        {"type": PydanticCustomError(problem["type"], problem["msg"]), "loc": problem["loc"], "input": problem["input"]}
        for problem in problems
    ]
    config = ConfigError.from_exception_data(error.title, details)  # type: ignore[arg-type]
    config.explanation = "\n".join(lines)
    return config


def _reason(problem: Any, model: type[BaseModel], data: Any) -> str:
    if problem["type"] == "extra_forbidden":
        owner = _model_at(model, problem["loc"][:-1], data)
        if owner is None:
            return "unknown field"
        name, fields = str(problem["loc"][-1]), list(owner.model_fields)
        closest = closest_name(name, fields)
        hint = f" (did you mean {closest!r}?)" if closest else ""
        return f"unknown field{hint}; {owner.__name__} takes: {', '.join(fields)}"
    message = str(problem["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if problem["type"] in ("value_error", "assertion_error", "missing") or "input" not in problem:
        return message
    return f"{message} (got {shortened(repr(problem['input']), 80)})"


def closest_name(name: str, names: list[str]) -> str | None:
    """The name `name` was most likely meant to be: a close spelling, else one sharing a word
    with it (`threshold` -> `rel_l1_thresh`)."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    words = [word for word in name.lower().split("_") if len(word) >= 4]
    for candidate in names:
        for part in candidate.lower().split("_"):
            if len(part) >= 4 and any(word.startswith(part) or part.startswith(word) for word in words):
                return candidate
    return None


def _model_at(model: type[BaseModel], location: tuple[Any, ...], data: Any) -> type[BaseModel] | None:
    """The model class a location inside `model` points into, if one: for a field that takes
    any config of a kind (an estimator), the class of the kind named in `data`."""
    for part in location:
        data = data.get(part) if isinstance(data, dict) else data[part] if isinstance(data, list) else None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        nested = _models_in(field.annotation) if field is not None else []
        if len(nested) != 1:
            return None
        model = _named_kind(nested[0], data)
    return model


def _named_kind(model: type[BaseModel], data: Any) -> type[BaseModel]:
    """The subclass of `model` whose name field is fixed to the name `data` gives, else `model`."""
    name_field = getattr(model, "name_field", None)
    if name_field is None or not isinstance(data, dict):
        return model
    pending = [model]
    while pending:
        candidate = pending.pop()
        default = candidate.model_fields[name_field].default
        if default == data.get(name_field):
            return candidate
        pending += candidate.__subclasses__()
    return model


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict, typing.Annotated):
        return [found for argument in typing.get_args(annotation) for found in _models_in(argument)]
    return []
