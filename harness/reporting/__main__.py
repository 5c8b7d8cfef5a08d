import sys

from harness.reporting.report import main

sys.exit(main())
