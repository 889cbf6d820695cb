"""The conformance matrix, shipped in the package for plugin authors (`pytest --pyargs
cachekit.conformance`), run here on everything installed; the conftest counts its cells."""

from cachekit.conformance import *  # noqa: F403
