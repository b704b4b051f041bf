"""`python -m wpipe.calibrate RUN_DIR`: the documented command; the code is wpipe.planning.calibrate."""
from .planning.calibrate import main

if __name__ == "__main__":
    raise SystemExit(main())
