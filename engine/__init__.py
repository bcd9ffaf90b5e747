"""SCAL-SDT's training engine: a library with no GUI dependency; also runs from `python -m engine`."""
