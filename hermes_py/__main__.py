import sys

from hermes_py.cli import main

sys.exit(main())
