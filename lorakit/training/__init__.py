"""The shared run lifecycle of every training command, its guards, the output folder, memory estimates, launch."""
