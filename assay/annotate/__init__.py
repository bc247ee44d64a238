"""Annotation: a calibrated cascade of judges assigns grades 0-4 to mined pairs."""
