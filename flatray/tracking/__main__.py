import sys

from flatray.tracking import main

sys.exit(main())
