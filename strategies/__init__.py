"""Built-in cache policies, one module each, each registered as a ``cachekit`` plugin."""
