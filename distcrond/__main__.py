import sys

from distcrond.cli import main

sys.exit(main())
