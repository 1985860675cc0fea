"""The @triton.jit kernels, kept apart so that triton is imported only when a Triton launcher first runs.

triton.jit decides at decoration time whether it compiles or interprets (TRITON_INTERPRET=1), so these modules
must be imported after that variable is set; the launchers in ``pluribus.kernels.<op>`` import them lazily.
"""
