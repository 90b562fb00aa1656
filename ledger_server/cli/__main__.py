"""`python -m ledger_server.cli`: the `ledger` operator CLI."""

import sys

from ledger_server.cli import main

sys.exit(main())
