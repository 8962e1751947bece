"""C fast path (arrives with the fast-path issue)."""
