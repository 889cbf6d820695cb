"""Errors cachekit raises for bad input. Each names what is wrong and what is allowed."""


def shortened(text: str, width: int) -> str:
    """`text` cut to `width` characters, ending in "..." where it was cut: a given value in a message."""
    return text if len(text) <= width else text[: width - 3] + "..."


class CachekitError(Exception):
    """Base of every cachekit error."""


class UnknownStrategyError(CachekitError, LookupError):
    """A strategy name that no loaded plugin registers."""


class UnknownEstimatorError(CachekitError, LookupError):
    """An estimator kind that no loaded plugin registers."""


class UnsupportedModelError(CachekitError, TypeError):
    """A model no registered adapter knows."""


class MissingPointError(CachekitError):
    """A strategy needs a point the model's adapter declares it cannot provide."""


class AlreadyAttachedError(CachekitError, RuntimeError):
    """A second strategy applied to a model that already has one."""


class HandleRemovedError(CachekitError, RuntimeError):
    """A handle used after `.remove()`."""


class PluginError(CachekitError):
    """A plugin that failed to load or registered something invalid."""


class StrategyError(CachekitError, RuntimeError):
    """A strategy decided something the runtime cannot do (e.g. reuse before any compute)."""


class StepCountError(CachekitError, RuntimeError):
    """A transformer call past the number of steps cachekit was told the generation has."""


class ConcurrentUseError(CachekitError, RuntimeError):
    """Two threads driving one transformer with a strategy attached at the same time."""


class RankDivergenceError(CachekitError, RuntimeError):
    """The ranks of a context-parallel group decided differently: one would compute, one skip."""


class EstimatorError(CachekitError, RuntimeError):
    """An estimator returned something that cannot stand for the value it was given."""


class KeptMemoryError(CachekitError, MemoryError):
    """What a strategy would keep is more than `max_kept_bytes` or the device's free memory."""


class BranchLevelError(CachekitError, ValueError):
    """The branch level cannot run as configured: no CFG to skip a branch of, or an estimator for
    predictions given where residuals are kept."""
