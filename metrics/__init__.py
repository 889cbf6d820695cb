"""Built-in quality metrics. Each module is a plugin registered through the entry-point group
``cachekit``, exactly as a third-party metric package would be."""
