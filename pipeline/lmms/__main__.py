import sys

from pipeline.lmms.cli import main

sys.exit(main())
