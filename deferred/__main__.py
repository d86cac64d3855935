"""``python -m deferred``: run the deferred manager."""

from __future__ import annotations

import sys

from deferred.manager import main

sys.exit(main())
