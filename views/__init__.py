"""The studio's Gradio UI: one module per tab, each with build() (widgets) and bind() (events
that call app/ services); `views.studio.build_app` lays the tabs out and wires them together,
`views.launch` starts it. Importing this package imports no gradio: the launcher makes the
private upload directory (GRADIO_TEMP_DIR, read when gradio is imported) first."""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no calls home
