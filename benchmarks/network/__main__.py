import sys

from benchmarks.network.run import main

sys.exit(main())
