"""Built-in cache strategies, one module each, each registered as a ``cachekit`` plugin."""
