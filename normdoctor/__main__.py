"""``python -m normdoctor``: the same as the ``normdoctor`` command."""

from .cli import main

main()
