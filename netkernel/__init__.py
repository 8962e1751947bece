"""NetKernel: the network stack as part of the virtualized infrastructure."""
