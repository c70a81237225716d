"""LCLM Studio entry point: `python app.py [--port P] ...` (the same as `lclm-studio` and
`python -m app`); the launcher is views/launch.py, where the UI and the engine meet."""

import sys

from views.launch import main

if __name__ == "__main__":
    sys.exit(main())
