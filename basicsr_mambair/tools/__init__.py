"""Data-preparation command-line tools (console scripts ``mambair-*``)."""
