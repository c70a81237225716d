"""The studio's state: the documents a session loaded, the variant catalog, the Ask tab's runs
and their history, the figures and the latent analysis the tabs show, and serving the page safely.
It calls the engine (app/engine/); the tabs in views/ call it."""
