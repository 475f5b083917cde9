MAX_SEGMENTS = 1024  # parts of a file coded side by side; a step adds at most one byte per segment to a context's counts
