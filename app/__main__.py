"""`python -m app`: the studio, as `lclm-studio` and `python app.py` start it. This entry point
joins the engine (app/) and the UI (views/), as app.py does; no other module of app/ imports views."""

import sys

from views.launch import main

sys.exit(main())
