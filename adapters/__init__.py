"""Built-in model-family adapters, one module each, each registered as a ``cachekit`` plugin."""
