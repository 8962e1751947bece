"""Reference model of NetKernel: pure Python, written to be read against spec/."""
