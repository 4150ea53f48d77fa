import sys

from refiner_rl.cli.main import main

sys.exit(main())
