"""Load the NetKernel conformance plugin for every pytest run from the repository root."""

pytest_plugins = ["netkernel.conformance.plugin"]
