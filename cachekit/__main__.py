from cachekit.cli import main

main()
