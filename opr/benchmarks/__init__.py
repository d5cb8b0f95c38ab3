"""Task streams: the embedded ``mini_trace`` (generated in code) and ``trace`` (TRACE's own files)."""
