import sys

from rmserve.cli import main

sys.exit(main())
