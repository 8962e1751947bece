"""The NetKernel conformance suite: pytest conformance --target reference|fastpath|exec:CMD."""
