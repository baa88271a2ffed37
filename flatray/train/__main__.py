import sys

from flatray.train.driver import main

sys.exit(main())
