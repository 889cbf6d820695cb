"""The base of every config that a registry looks up by name: a strategy's (`strategy`), an
estimator's (`kind`), a diffusers method's in a study (`strategy`). Each subclass fixes its name
as the default of a `Literal` field, so the class and its name cannot drift apart."""

from __future__ import annotations

from typing import ClassVar

from pydantic import ConfigDict

from cachekit.schemas.checked import Checked


class NamedConfig(Checked):
    """Unknown fields are rejected, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The field that holds the name.
    name_field: ClassVar[str]

    @classmethod
    def registered_name(cls) -> str:
        """The name the class fixes (the default of its name field)."""
        return str(cls.model_fields[cls.name_field].default)
