import sys

from tomqueue.cli import main

sys.exit(main())
