import sys

from elasticep.cli import main

sys.exit(main())
