"""What the library writes for people to read: atomic files and figures, interleaved timings, result files."""
