"""fltapp: a deterministic Flower app driven by FLT_* environment variables."""
