import sys

from llamacontroller.cli import main

sys.exit(main())
