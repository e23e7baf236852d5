"""``python -m captum_interactions demo --out DIR``: the package's command line."""
import sys

from captum_interactions.demo import main

if __name__ == "__main__":
    sys.exit(main())
