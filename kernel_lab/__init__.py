"""kernel_lab: everything around the evolved kernels that is not evolved.

Real 4-bit models with no network (`models`), fine-tuning data (`data`), the kernel
contract (`contract`), reference and stock kernels (`ops`), correctness checks,
benchmarks, the patcher that installs kernels into mlx-lm models, and the sandbox
that runs untrusted candidate programs.
"""

__version__ = "0.1.0"
