"""``python -m search.workers``: one worker process, as the supervisor starts it."""

import sys

from search.workers.child import child_main

sys.exit(child_main())
