import sys

from timemachine.cli import main

sys.exit(main())
