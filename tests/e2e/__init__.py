"""End-to-end tests: a real JupyterHub with GPUSpawner on the private engine (tests/hub.py)."""
