"""The model catalog: the models the config names or ``models_dir`` holds (``entries.py``), what a GGUF header
says (``gguf_meta.py``), what a request needs of a backend (``requirements.py``) and each model's settings
resolved once (``profile.py``: its policy and the ``LaunchSpec`` it asks a runtime for)."""
