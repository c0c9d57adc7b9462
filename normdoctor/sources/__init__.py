"""Sources: what a scan runs on (see :class:`Source`)."""
