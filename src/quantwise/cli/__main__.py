import sys

from quantwise.cli import main

sys.exit(main())
