import sys

from flatray.sweep import main

sys.exit(main())
