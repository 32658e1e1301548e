import sys

from fastsearch.cli import main

sys.exit(main())
