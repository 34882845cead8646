"""@triton.jit kernels of :mod:`kernels.gdn.triton_chunk` (the host side and the maths live there).

Kept as a package of plain modules so that triton_chunk can load a second copy of it decorated
in the other Triton mode (compiled / interpreter): relative imports inside a copy resolve to the
copy's own modules.
"""
