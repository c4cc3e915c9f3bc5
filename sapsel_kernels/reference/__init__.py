"""Pure-PyTorch references of every sapsel op: the CPU fallback and the test oracle."""
