"""``python -m drs_ext.cli`` is the ``drs`` command (e.g. ``torchrun … -m drs_ext.cli certify …``,
which needs no path to the ``drs`` script)."""

import sys

from . import main

sys.exit(main())
