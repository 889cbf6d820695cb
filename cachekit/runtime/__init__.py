"""The plumbing between one transformer, one strategy and its estimator.

Hooks (diffusers' `ModelHook`s, so they stack with diffusers' own offloading and casting hooks)
sit on the transformer, on the blocks of the residual span and on attention/MLP modules, only
where the strategy asked. Each concern is one module:

- `framing`: each transformer call becomes a step and branch of a generation, with its state;
- `span`: the span's blocks compute, or pass their inputs through and add the estimated residual;
- `modules`: an attention or MLP module computes, or returns its estimated output;
- `memory`: what the estimator keeps, known from the first value and checked against the limits;
- `installing`: putting the hooks on and taking them off, leaving the modules as found;
- `runtime`: the `Runtime` that ties them together for one transformer.

What computes runs its own forward on the exact same arguments; nothing else changes.
"""

from cachekit.runtime.runtime import Runtime

__all__ = ["Runtime"]
