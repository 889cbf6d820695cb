"""Built-in estimators, one module each, each registered as a ``cachekit`` plugin."""
