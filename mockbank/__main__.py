"""`python -m mockbank`: the same as the `mockbank` console script (mockbank.server)."""

import sys

from mockbank.server import main

sys.exit(main())
