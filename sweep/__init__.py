"""Process plumbing of a sweep that must stay import-light (see :mod:`sweep.lifeline`)."""
