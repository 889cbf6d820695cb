raise ImportError("cachekit_broken needs a library that is not installed")
