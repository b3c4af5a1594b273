"""vaewatch: the command line and the settings that tie detector, trainer and streams together."""
