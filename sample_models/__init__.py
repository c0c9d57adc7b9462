"""Sample models whose train/eval truth is known (see README.md, MANIFEST.json)."""
