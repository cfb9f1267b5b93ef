import sys

from koopman_search.search.cli import main

sys.exit(main())
