"""Legacy entry point. The build is declared in pyproject.toml (scikit-build-core driving
CMakeLists.txt); `python setup.py develop|install` forwards to pip so old habits still work."""

import subprocess
import sys
from pathlib import Path

COMMANDS = {"develop": ["-e", "."], "install": ["."]}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        sys.exit("usage: python setup.py develop|install   (or: pip install [-e] .)")
    root = Path(__file__).resolve().parent
    sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *COMMANDS[sys.argv[1]]], cwd=root))
