import sys

from ufw.analysis.cli import main

sys.exit(main())
