"""A built-in method's config, as docs/plugins.md shows it."""

from typing import Literal

from pydantic import Field

from cachekit.schemas.configs import StrategyConfig


class EveryFourthConfig(StrategyConfig):
    """Compute every fourth step."""

    strategy: Literal["every_fourth"] = "every_fourth"
    offset: int = Field(default=0, ge=0, le=3)
