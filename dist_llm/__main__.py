import sys

from dist_llm.cli import main

sys.exit(main())
