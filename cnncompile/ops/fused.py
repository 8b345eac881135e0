"""Ops of cnncompile's own that passes create: fused convolutions and elementwise chains."""
