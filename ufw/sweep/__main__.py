"""`python -m ufw.sweep SPACE.yaml`: see ufw/sweep/__init__.py."""

import sys

from ufw.sweep.driver import main

sys.exit(main())
