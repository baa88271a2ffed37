import sys

from flatray.report import main

sys.exit(main())
