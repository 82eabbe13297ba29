"""The Lightning side: the two training modules, their callbacks, the EMA and the loggers."""
