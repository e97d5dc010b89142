"""Loss kernels of the online methods, one file each (see rft.train.online)."""
