"""`python -m chaos`: the chaos run (see `chaos`)."""

import sys

from chaos.run import main

sys.exit(main())
