"""``python -m koopman_search.search.workers``: one worker process, as the supervisor starts it."""

import sys

from koopman_search.search.workers.child import child_main

sys.exit(child_main())
