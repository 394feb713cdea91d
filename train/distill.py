"""Entry point for ``accelerate launch train/distill.py --config RECIPE.yaml key=value ...``."""

import os
import sys

from fastdiff.run import main

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(0)  # gloo ranks sometimes abort at interpreter exit; the work is done and flushed
