"""Adapters on disk: peftlab's own folder format, the peft library's, one key scheme for both, and one load
routine that reads either."""
