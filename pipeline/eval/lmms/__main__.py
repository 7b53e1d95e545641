import sys

from pipeline.eval.lmms.cli import main

sys.exit(main())
